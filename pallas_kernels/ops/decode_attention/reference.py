"""Decode attention in plain JAX: the "xla" implementation and the float64 test oracle.

One query token per sequence, at position `lengths - 1`, attends to cache rows
`max(0, lengths - sliding_window) .. lengths - 1`. Garbage in the other slots (NaN, inf,
1e30, another request's keys) cannot reach the output, and a row with `lengths <= 0` has no
visible key and outputs zeros. The computation runs in float32, or in float64 when the inputs
are float64 (the oracle).

This is also what the engine runs in every decode step of every layer on CPU, so it reads
the caches as stored, `[batch, max_len, num_kv_heads, head_dim]`, and never copies them:

- Keys: the scores of masked slots are replaced by -inf with `where`, which selects past a
  NaN/inf score, so no key needs masking. (Masking K and V by value, as this function used to,
  wrote a masked and, for the einsums' (batch, kv_head) batching, transposed copy of both
  caches per layer per step.)
- Values: p is exactly 0 outside the visible range, but 0 * NaN and 0 * inf are NaN. The
  product `p @ v` therefore runs on the raw cache, and only when its result holds a non-finite
  value is it recomputed from a `where`-masked copy of V (`lax.cond`: the copy is paid only
  then, e.g. for a NaN-poisoned cache; the engine's caches hold finite values). A finite result
  proves that every masked slot was finite and contributed exactly 0.
- The contractions: with few KV heads, one batched matmul per side with only `batch` as the
  batch dimension, so XLA reads the cache as a bitcast `[batch, max_len * kv_heads, head_dim]`
  (resp. `[batch, max_len, kv_heads * head_dim]`); it computes every (query head, KV head) pair
  and keeps the matching ones (the block diagonal). That is `num_kv_heads` times the FLOPs, but
  XLA:CPU's matmuls beat its other reductions up to `_MAX_BLOCK_DIAGONAL_KV_HEADS`; beyond
  that, a multiply-and-reduce in the stored layout, which does only the needed FLOPs.
  (Batching the einsum over (batch, kv_head) makes XLA transpose both caches.)
- An optimization barrier on the caches: in the engine's decode step they come straight from
  the in-place scatter of the new token's K/V; at batch 1 XLA otherwise fuses that scatter into
  the bitcast feeding the matmul, a second scatter that needs its own copies of the cache
  (4-8 cache-sized copies per layer in SmolLM2's compiled step, none with the barrier).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Above this many KV heads the block-diagonal matmuls waste more FLOPs than they save;
# measured on XLA:CPU, see bench/notes/decode_attention.md.
_MAX_BLOCK_DIAGONAL_KV_HEADS = 4


def visible_range(lengths, max_len: int, sliding_window: int | None):
  """`[lo, hi)` of visible cache rows per batch row; lengths are clamped to [0, max_len]."""
  hi = jnp.clip(lengths, 0, max_len)
  lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(hi - sliding_window, 0)
  return lo, hi


def _block_diagonal(x, num_kv_heads: int, axis1: int, axis2: int):
  """The entries of x whose two KV-head axes (the cache's, the query head's) agree, stacked at
  axis1 < axis2: static slices, which XLA fuses into one small loop (no gather)."""
  diag = [jax.lax.index_in_dim(jax.lax.index_in_dim(x, h, axis2, keepdims=False), h, axis1,
                               keepdims=False) for h in range(num_kv_heads)]
  return jnp.stack(diag, axis=axis1)


def decode_attention(q, k_cache, v_cache, lengths, *, scale: float | None = None,
                     sliding_window: int | None = None, logit_softcap: float | None = None):
  """q `[batch, num_heads, head_dim]`, caches `[batch, max_len, num_kv_heads, head_dim]`."""
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 for the oracle
  block_diagonal = num_kv_heads <= _MAX_BLOCK_DIAGONAL_KV_HEADS

  lo, hi = visible_range(lengths, max_len, sliding_window)
  pos = jnp.arange(max_len)
  visible = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])  # [batch, max_len]
  keep = visible[:, :, None, None]  # against [batch, max_len, num_kv_heads, ...]

  # Keeps XLA from fusing the caller's cache update into the matmuls' operands (see above).
  k_cache, v_cache = jax.lax.optimization_barrier((k_cache, v_cache))
  q_scaled = q.astype(acc_dtype) * scale  # [batch, num_heads, head_dim]: cheaper than scaling s
  if block_diagonal:
    s = jnp.einsum("btkd,bhd->btkh", k_cache, q_scaled, preferred_element_type=acc_dtype)
    s = s.reshape(batch, max_len, num_kv_heads, num_kv_heads, group)  # [b, t, kv, q's kv, g]
    s = _block_diagonal(s, num_kv_heads, axis1=2, axis2=3)
  else:
    qg = q_scaled.reshape(batch, 1, num_kv_heads, group, head_dim)
    s = jnp.sum(k_cache[:, :, :, None, :].astype(acc_dtype) * qg, axis=-1)
  # s: [batch, max_len, num_kv_heads, group]
  if logit_softcap is not None:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  s = jnp.where(keep, s, -jnp.inf)  # selects past NaN/inf scores of garbage keys
  m = jnp.max(s, axis=1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)  # an empty row: every s is -inf, p is 0
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=1)[..., None]     # [batch, num_kv_heads, group, 1]

  def weighted_values(v):  # -> [batch, num_kv_heads, group, head_dim]
    if block_diagonal:
      o = jnp.einsum("bth,btkd->bhkd", p.reshape(batch, max_len, num_heads), v,
                     preferred_element_type=acc_dtype)
      o = o.reshape(batch, num_kv_heads, group, num_kv_heads, head_dim)  # [b, q's kv, g, kv, d]
      return _block_diagonal(o, num_kv_heads, axis1=1, axis2=3)
    return jnp.sum(p[..., None] * v[:, :, :, None, :].astype(acc_dtype), axis=1)

  o = weighted_values(v_cache)
  o = jax.lax.cond(jnp.all(jnp.isfinite(o)), lambda: o,
                   lambda: weighted_values(jnp.where(keep, v_cache, 0)))
  o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1), 0)
  return o.reshape(batch, num_heads, head_dim).astype(q.dtype)
