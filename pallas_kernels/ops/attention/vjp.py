"""The differentiable kernel paths: a forward kernel + FlashAttention backward under custom_vjp.

Two forwards, "triton" (`triton.py`) and "mosaic" (`mosaic.py`, Hopper), both return the output
and the fp32 natural-log log-sum-exp [batch, q_len, num_heads] that both backwards read. The
forward saves q, k, v, lengths, q_offset, the output and the lse. The backward is
`mosaic_bwd.backward` (Hopper, wgmma/TMA) after the Mosaic forward when it takes the call
(decided statically: `mosaic_bwd.refuses`; tiles from `mosaic_bwd.heuristic`, `bwd_config`
is the Triton backward's), else `triton_bwd.backward`. Nothing of the size
[q_len, kv_len] is ever stored. Under `jax.checkpoint` the residuals follow the policy like
any other values (with `nothing_saveable` the forward kernel runs again in the backward).
`lengths` and `q_offset` are integer inputs: their cotangents are zero (None).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.ops.attention import config as config_lib
from pallas_kernels.ops.attention import config_bwd
from pallas_kernels.ops.attention import mosaic as mosaic_fwd
from pallas_kernels.ops.attention import mosaic_bwd
from pallas_kernels.ops.attention import triton as triton_fwd
from pallas_kernels.ops.attention import triton_bwd


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: a nondiff argument of the custom_vjp)."""

  forward: str  # "triton" or "mosaic": which forward kernel runs
  causal: bool
  window: int | None
  softcap: float | None
  scale: float
  cfg: config_lib.AttentionConfig | mosaic_fwd.MosaicAttentionConfig  # the forward's config
  bwd_cfg: config_bwd.AttentionBwdConfig
  interpret: bool

  def kernel_kwargs(self) -> dict:
    return dict(causal=self.causal, window=self.window, softcap=self.softcap, scale=self.scale,
                interpret=self.interpret)


def attention(q, k, v, *, causal: bool = True,
              config: config_lib.AttentionConfig | None = None, **kwargs):
  """The "triton" implementation of `pallas_kernels.attention`. Arguments are checked by
  `api.attention`; the rest of `kwargs` as `_differentiable`."""
  _, q_len, _, head_dim = q.shape
  cfg = config_lib.resolve(config, head_dim=head_dim, dtype=q.dtype, causal=causal,
                           q_len=q_len, kv_len=k.shape[1])
  return _differentiable("triton", cfg, q, k, v, causal=causal, **kwargs)


def mosaic_attention(q, k, v, *, config: mosaic_fwd.MosaicAttentionConfig | None = None,
                     **kwargs):
  """The "mosaic" implementation (Hopper forward and backward; the Triton backward for what
  `mosaic_bwd` refuses). Arguments are checked by `api.attention` and `mosaic.refuses`."""
  if kwargs.get("lengths") is not None:
    k, v = _zero_past_lengths(k, v, kwargs["lengths"])
  return _differentiable("mosaic", config or mosaic_fwd.heuristic(q.shape[-1]), q, k, v,
                         **kwargs)


def _zero_past_lengths(k, v, lengths):
  """Keys and values past `lengths` set to 0. The Mosaic kernels mask scores, not loads: a
  masked key still enters the wgmma with P = 0, and 0 x inf (stale or poisoned cache rows) is
  NaN. One elementwise pass over K and V, small beside the kernel's O(q_len * kv_len) work."""
  visible = jnp.arange(k.shape[1])[None, :, None, None] < lengths[:, None, None, None]
  return jnp.where(visible, k, jnp.zeros_like(k)), jnp.where(visible, v, jnp.zeros_like(v))


def _differentiable(forward: str, cfg, q, k, v, *, causal: bool = True, lengths=None,
                    q_offset=None, sliding_window: int | None = None,
                    logit_softcap: float | None = None, scale: float | None = None,
                    bwd_config: config_bwd.AttentionBwdConfig | None = None,
                    interpret: bool = False):
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  shape = dict(head_dim=head_dim, dtype=q.dtype, causal=causal, q_len=q_len, kv_len=kv_len)
  static = _Static(
      forward=forward, causal=causal, window=sliding_window,
      softcap=None if logit_softcap is None else float(logit_softcap),
      scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
      cfg=cfg, bwd_cfg=config_bwd.resolve(bwd_config, **shape), interpret=interpret)
  if lengths is None:
    lengths = jnp.full((batch,), kv_len, jnp.int32)
  if q_offset is None:
    q_offset = jnp.full((batch,), kv_len - q_len, jnp.int32)
  return _attention(q, k, v, lengths, q_offset, static)


def _forward(q, k, v, lengths, q_offset, static: _Static, *, return_lse: bool):
  if static.forward == "mosaic":  # always computes the lse: it costs one row of fp32 a query
    o, lse = mosaic_fwd.forward(q, k, v, lengths, q_offset, cfg=static.cfg,
                                **static.kernel_kwargs())
    return (o, lse) if return_lse else o
  return triton_fwd._attention(q, k, v, lengths, q_offset, cfg=static.cfg,
                               return_lse=return_lse, count_tiles=False,
                               **static.kernel_kwargs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, lengths, q_offset, static: _Static):
  return _forward(q, k, v, lengths, q_offset, static, return_lse=False)


def _attention_fwd(q, k, v, lengths, q_offset, static: _Static):
  o, lse = _forward(q, k, v, lengths, q_offset, static, return_lse=True)
  return o, (q, k, v, lengths, q_offset, o, lse)


def _attention_bwd(static: _Static, residuals, do):
  q, k, v, lengths, q_offset, o, lse = residuals
  if static.forward == "mosaic" and mosaic_bwd.refuses(q) is None:
    dq, dk, dv = mosaic_bwd.backward(q, k, v, lengths, q_offset, o, lse, do.astype(o.dtype),
                                     cfg=mosaic_bwd.heuristic(q.shape[-1]),
                                     **static.kernel_kwargs())
    return dq, dk, dv, None, None
  dq, dk, dv = triton_bwd.backward(q, k, v, lengths, q_offset, o, lse, do.astype(o.dtype),
                                   cfg=static.bwd_cfg, **static.kernel_kwargs())
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
