"""Plain-JAX attention: the "xla" implementation and the float64 test oracle.

GQA without repeating K/V: q is viewed as [batch, q_len, num_kv_heads, group, head_dim] and
each kv head meets its `group` query heads in one einsum. Computes in float32 (float64 when
given float64, for the oracle) and returns q's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def visible_mask(q_len: int, kv_len: int, *, causal: bool, lengths=None, q_offset=None,
                 sliding_window: int | None = None):
  """bool [batch or 1, q_len, kv_len]: may query i see key j?

  Query i sits at absolute position q_offset + i. Key j is visible when j < lengths and, if
  causal, j <= position, and, with a window W, position - W < j.
  """
  if q_offset is None:
    q_offset = jnp.full((1,), kv_len - q_len, jnp.int32)
  pos = q_offset[:, None, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :, None]
  key = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
  visible = jnp.ones((1, q_len, kv_len), bool)
  if lengths is not None:
    visible = visible & (key < lengths[:, None, None])
  if causal:
    visible = visible & (key <= pos)
    if sliding_window is not None:
      visible = visible & (key > pos - sliding_window)
  return visible


def logits(q, k, *, logit_softcap: float | None = None, scale: float | None = None):
  """Scaled (and soft-capped) q·k: [batch, num_kv_heads, group, q_len, kv_len]."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  compute = jnp.promote_types(q.dtype, jnp.float32)
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  q = q.astype(compute).reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k.astype(compute),
                 precision=jax.lax.Precision.HIGHEST) * scale
  if logit_softcap is not None:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  return s


def attention_with_lse(q, k, v, *, causal: bool = True, lengths=None, q_offset=None,
                       sliding_window: int | None = None, logit_softcap: float | None = None,
                       scale: float | None = None):
  """(out [batch, q_len, num_heads, head_dim] in q's dtype, lse [batch, q_len, num_heads]).

  A query that sees no key outputs zeros and has lse = -inf.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  s = logits(q, k, logit_softcap=logit_softcap, scale=scale)
  visible = visible_mask(q_len, kv_len, causal=causal, lengths=lengths, q_offset=q_offset,
                         sliding_window=sliding_window)[:, None, None]  # [b, 1, 1, q, k]
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows that see nothing: exp(-inf - 0) = 0
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(l > 0, l, 1.0), v.astype(s.dtype),
                 precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]  # [b,h,g,q]
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(batch, q_len, num_heads)
  return o.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype), lse


def attention(q, k, v, *, causal: bool = True, lengths=None, q_offset=None,
              sliding_window: int | None = None, logit_softcap: float | None = None,
              scale: float | None = None):
  """Reference attention; same semantics as `pallas_kernels.attention`."""
  return attention_with_lse(q, k, v, causal=causal, lengths=lengths, q_offset=q_offset,
                            sliding_window=sliding_window, logit_softcap=logit_softcap,
                            scale=scale)[0]
