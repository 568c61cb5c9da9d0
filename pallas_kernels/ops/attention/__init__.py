"""Prefill / general attention: FlashAttention-2 forward and backward in Pallas (Triton), an
FA3-style Hopper forward in Mosaic GPU, and the reference."""

from pallas_kernels.ops.attention.api import attention as attention
from pallas_kernels.ops.attention.config import AttentionConfig as AttentionConfig
from pallas_kernels.ops.attention.config_bwd import AttentionBwdConfig as AttentionBwdConfig
from pallas_kernels.ops.attention.mosaic import MosaicAttentionConfig as MosaicAttentionConfig
