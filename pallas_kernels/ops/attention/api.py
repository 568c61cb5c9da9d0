"""`attention`: argument checks, then dispatch to the Pallas kernels or the XLA reference.

Every implementation is differentiable: "triton" through its FlashAttention-2 backward kernels
(`vjp.py`, `triton_bwd.py`), "mosaic" through Hopper backward kernels (`mosaic_bwd.py`), "xla"
by autodiff of the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._core import checks, dispatch
from pallas_kernels.ops.attention import mosaic as mosaic_impl
from pallas_kernels.ops.attention import reference
from pallas_kernels.ops.attention import triton as triton_impl
from pallas_kernels.ops.attention import vjp
from pallas_kernels.ops.attention.config import AttentionConfig
from pallas_kernels.ops.attention.config_bwd import AttentionBwdConfig
from pallas_kernels.ops.attention.mosaic import MosaicAttentionConfig

OP = "attention"


_reference_jit = jax.jit(reference.attention, static_argnames=(
    "causal", "sliding_window", "logit_softcap", "scale"))


IMPLEMENTATIONS = (
    dispatch.Implementation("triton", vjp.attention, refuses=triton_impl.refuses),
    # After "triton": the default stays Triton until a real H100 has validated this kernel.
    dispatch.Implementation("mosaic", vjp.mosaic_attention, hopper_only=True,
                            refuses=mosaic_impl.refuses),
    dispatch.Implementation("xla", _reference_jit, is_pallas=False),
)


def attention(q, k, v, *, causal: bool = True, lengths=None, q_offset=None,
              sliding_window: int | None = None, logit_softcap: float | None = None,
              scale: float | None = None, impl: str | None = None, interpret: bool = False,
              config: AttentionConfig | MosaicAttentionConfig | None = None,
              bwd_config: AttentionBwdConfig | None = None):
  """Multi-head attention for prefill and general use: softmax(scale · q kᵀ + mask) v.

  Args:
    q: [batch, q_len, num_heads, head_dim], float32, bfloat16 or float16.
    k, v: [batch, kv_len, num_kv_heads, head_dim], q's dtype. MHA, GQA and MQA:
      `num_heads % num_kv_heads == 0`; query head h reads kv head h // (num_heads //
      num_kv_heads). K/V are never repeated.
    causal: query at absolute position p sees keys j <= p.
    lengths: int32 [batch]; keys at positions >= lengths[b] are masked (ragged batches).
    q_offset: int32 [batch]; absolute position of q[:, 0], so a chunk of queries can continue a
      longer cache (chunked prefill). Default `kv_len - q_len` (queries are the last positions).
      Only causal masking and the sliding window read it.
    sliding_window: W (Mistral): key j is visible to query i when i - W < j <= i. Needs causal.
    logit_softcap: c (Gemma 2): logits = c * tanh(logits / c), after scaling.
    scale: logit scale, default 1 / sqrt(head_dim).
    impl: "triton", "mosaic" or "xla"; None picks the Triton kernel on a GPU (or with
      interpret=True), else xla.
      "triton": FlashAttention-2 forward (Ampere and Hopper), every option above.
      "mosaic": FlashAttention-3-style forward for Hopper (Mosaic GPU: TMA producer, two wgmma
        consumer warpgroups), every option above; bfloat16/float16 and head_dim 64 or 128
        only (else refused with the reason). Backward: Mosaic GPU dk/dv and dq kernels
        (`bwd_config` configures only the Triton backward). Not yet validated on a GPU, hence
        never the default.
    interpret: run the Pallas kernel in interpret mode (CPU; Mosaic GPU's interpreter for
      "mosaic").
    config: an `AttentionConfig` ("triton"; default: the tuned table of the device, else a
      heuristic) or a `mosaic.MosaicAttentionConfig` ("mosaic"; default: a heuristic).
    bwd_config: an `AttentionBwdConfig` for the backward kernels (jax.grad and friends);
      default as for `config`.

  Returns:
    [batch, q_len, num_heads, head_dim] in q's dtype. A query that sees no key at all (its
    batch row has length 0, or every key is masked for it) outputs zeros, not NaN, and gets
    zero gradients. Differentiable in q, k and v (jax.grad, vjp, checkpoint, vmap, jit).
  """
  _check(q, k, v, causal=causal, lengths=lengths, q_offset=q_offset,
         sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale)
  checks.config_type(OP, config, (AttentionConfig, MosaicAttentionConfig))
  checks.config_type(OP, bwd_config, AttentionBwdConfig, "bwd_config")
  if q.shape[1] == 0 or k.shape[1] == 0:  # no queries, or no key for any of them
    return jnp.zeros(q.shape, q.dtype)
  return dispatch.call(OP, impl, interpret, IMPLEMENTATIONS, q, k, v, causal=causal,
                       lengths=lengths, q_offset=q_offset, sliding_window=sliding_window,
                       logit_softcap=logit_softcap, scale=scale, config=config,
                       bwd_config=bwd_config)


def _check(q, k, v, *, causal, lengths, q_offset, sliding_window, logit_softcap, scale):
  layout = "[batch, seq_len, heads, head_dim]"
  for name, x in (("q", q), ("k", k), ("v", v)):
    checks.array(OP, name, x, ndim=4, layout=layout)
  checks.same_dtype(OP, ("q", "k", "v"), (q, k, v))
  batch, _, num_heads, head_dim = q.shape
  checks.dim(OP, "k", k, 0, batch, "batch of q")
  checks.dim(OP, "k", k, 3, head_dim, "head_dim of q")
  checks.shape(OP, "v", v, k.shape, "the shape of k")
  num_kv_heads = k.shape[2]
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"{OP}: `k` expected num_kv_heads dividing num_heads = {num_heads} "
                     f"(axis 2), got shape {tuple(k.shape)}")
  if not isinstance(causal, bool):
    raise TypeError(f"{OP}: `causal` expected a bool, got {type(causal).__name__}")
  if lengths is not None:
    checks.int_vector(OP, "lengths", lengths, batch)
  if q_offset is not None:
    checks.int_vector(OP, "q_offset", q_offset, batch)
  checks.positive_int(OP, "sliding_window", sliding_window)
  if sliding_window is not None and not causal:
    raise ValueError(f"{OP}: `sliding_window` expected causal=True (Mistral window "
                     f"i - W < j <= i), got causal=False")
  checks.positive_float(OP, "logit_softcap", logit_softcap)
  checks.positive_float(OP, "scale", scale)
