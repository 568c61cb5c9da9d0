"""Decode attention in plain JAX: the "xla" implementation and the float64 test oracle.

One query token per sequence, at position `lengths - 1`, attends to cache rows
`max(0, lengths - sliding_window) .. lengths - 1`. Everything else in the cache is
masked out *by value* (`where`, not by adding a large negative number), so garbage in
slots beyond `lengths` (NaN, 1e30, another request's keys) cannot reach the output.
A row with `lengths <= 0` has no visible key and outputs zeros.
"""

from __future__ import annotations

import jax.numpy as jnp


def visible_range(lengths, max_len: int, sliding_window: int | None):
  """`[lo, hi)` of visible cache rows per batch row; lengths are clamped to [0, max_len]."""
  hi = jnp.clip(lengths, 0, max_len)
  lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(hi - sliding_window, 0)
  return lo, hi


def decode_attention(q, k_cache, v_cache, lengths, *, scale: float | None = None,
                     sliding_window: int | None = None, logit_softcap: float | None = None):
  """q `[batch, num_heads, head_dim]`, caches `[batch, max_len, num_kv_heads, head_dim]`."""
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 for the oracle

  lo, hi = visible_range(lengths, max_len, sliding_window)
  pos = jnp.arange(max_len)
  visible = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])  # [batch, max_len]
  keep = visible[:, :, None, None]
  k = jnp.where(keep, k_cache, 0).astype(acc_dtype)
  v = jnp.where(keep, v_cache, 0).astype(acc_dtype)

  qg = q.reshape(batch, num_kv_heads, group, head_dim).astype(acc_dtype)
  s = jnp.einsum("bkgd,btkd->bkgt", qg, k) * scale
  if logit_softcap is not None:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  mask = visible[:, None, None, :]
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)  # an empty row: every s is -inf, p is 0
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgt,btkd->bkgd", p, v)
  o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1), 0)
  return o.reshape(batch, num_heads, head_dim).astype(q.dtype)
