"""Pallas GPU kernels for LLM inference and training, each with a plain-JAX reference.

Every op takes `impl=` ("xla", "triton"; None picks the best for the current device, "xla" on
CPU) and `interpret=True` to run the Pallas kernel on CPU. See `pallas_kernels/ops/<op>/`.
"""

from pallas_kernels.ops.attention import AttentionBwdConfig, AttentionConfig, attention
from pallas_kernels.ops.decode_attention import DecodeAttentionConfig, decode_attention
from pallas_kernels.ops.matmul import MatmulConfig, gated_matmul, matmul
from pallas_kernels.ops.normalization import NormConfig, layer_norm, rms_norm
from pallas_kernels.ops.paged_attention import PagedAttentionConfig, paged_attention

__all__ = [
    "attention", "decode_attention", "paged_attention", "matmul", "gated_matmul", "rms_norm",
    "layer_norm", "AttentionConfig", "AttentionBwdConfig", "DecodeAttentionConfig",
    "PagedAttentionConfig", "MatmulConfig", "NormConfig",
]
