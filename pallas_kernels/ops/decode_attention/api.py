"""Public decode attention (flash-decoding): argument checks, then dispatch ("triton" or "xla").

One new token per sequence attends to its KV cache:

  q        `[batch, num_heads, head_dim]`, the token at position `lengths - 1` (its own K/V
           already written to the cache by the caller, so it attends to itself);
  k_cache, v_cache `[batch, max_len, num_kv_heads, head_dim]`, `num_heads % num_kv_heads == 0`
           (MHA, GQA and MQA: query head i reads KV head i // (num_heads // num_kv_heads));
  lengths  int32 `[batch]`, the number of valid cache rows per sequence (a runtime value).

Key j is visible when `lengths - sliding_window <= j < lengths` (all `j < lengths` without a
window). Scores are `q.k * scale` (default head_dim ** -0.5), then `logit_softcap * tanh(s /
logit_softcap)` when given. Cache rows outside the visible range are never read by the kernel,
so stale data or NaN there cannot leak. A row with `lengths == 0` has nothing to attend to and
outputs zeros; lengths are clamped to [0, max_len]. q, k_cache and v_cache share one float dtype
(fp32, bf16 or fp16); the output has q's shape and dtype. Works under jit and vmap.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._core import checks, dispatch
from pallas_kernels.ops.decode_attention import reference
from pallas_kernels.ops.decode_attention import triton as triton_impl
from pallas_kernels.ops.decode_attention.config import DecodeAttentionConfig

OP = "decode_attention"
_STATIC = ("scale", "sliding_window", "logit_softcap")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _reference_jit(q, k_cache, v_cache, lengths, **kwargs):
  return reference.decode_attention(q, k_cache, v_cache, lengths, **kwargs)


_IMPLS = (
    dispatch.Implementation("triton", triton_impl.decode_attention, refuses=triton_impl.refuses),
    dispatch.Implementation("xla", _reference_jit, is_pallas=False),
)


def _check(q, k_cache, v_cache, lengths, scale, sliding_window, logit_softcap, config) -> None:
  checks.array(OP, "q", q, ndim=3, layout="[batch, num_heads, head_dim]")
  cache_layout = "[batch, max_len, num_kv_heads, head_dim]"
  checks.array(OP, "k_cache", k_cache, ndim=4, layout=cache_layout)
  checks.array(OP, "v_cache", v_cache, ndim=4, layout=cache_layout)
  checks.same_dtype(OP, ("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
  batch, num_heads, head_dim = q.shape
  checks.dim(OP, "k_cache", k_cache, 0, batch, "batch = q.shape[0]")
  checks.dim(OP, "k_cache", k_cache, 3, head_dim, "head_dim = q.shape[2]")
  checks.shape(OP, "v_cache", v_cache, tuple(k_cache.shape), "the shape of `k_cache`")
  max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  if max_len < 1 or num_kv_heads < 1 or head_dim < 1:
    raise ValueError(f"{OP}: `k_cache` expected max_len, num_kv_heads and head_dim >= 1, "
                     f"got shape {tuple(k_cache.shape)}")
  if num_heads % num_kv_heads:
    raise ValueError(f"{OP}: `q` expected num_heads a multiple of num_kv_heads = {num_kv_heads} "
                     f"(k_cache.shape[2]), got num_heads = {num_heads}")
  checks.int_vector(OP, "lengths", lengths, batch)
  checks.decode_options(OP, scale, sliding_window, logit_softcap)
  checks.config_type(OP, config, DecodeAttentionConfig)


def decode_attention(q, k_cache, v_cache, lengths, *, scale: float | None = None,
                     sliding_window: int | None = None, logit_softcap: float | None = None,
                     impl: str | None = None, interpret: bool = False,
                     config: DecodeAttentionConfig | None = None):
  """Attention of one new token per sequence over its KV cache; see the module docstring."""
  _check(q, k_cache, v_cache, lengths, scale, sliding_window, logit_softcap, config)
  return dispatch.call(OP, impl, interpret, _IMPLS, q, k_cache, v_cache, lengths, scale=scale,
                       sliding_window=sliding_window, logit_softcap=logit_softcap, config=config)
