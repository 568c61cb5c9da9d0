"""FlashAttention-2 backward in Pallas, lowered through Triton (Ampere and Hopper).

From the forward's saved output O and natural-log log-sum-exp L (fp32, -inf for a row that
sees no key), with s = scale * q.k (soft-capped: t = c * tanh(s / c)), P = exp(t - L):
  dV = P^T dO     dP = dO V^T     dT = P * (dP - delta),  delta = rowsum(dO * O)
  dS = dT * (1 - tanh^2(s / c)) (softcap; else dS = dT)     dQ = scale dS K     dK = scale dS^T Q
Three kernels, no atomics (deterministic; dq costs a second recompute of S and dP):
  preprocess   rows of [batch * q_len * num_heads]: delta, and L in base 2 with +inf for a row
               that sees no key (so P = exp2(s - inf) = 0: zero gradients, not NaN).
  dk/dv        grid (kv_tile, batch, kv_head). The program holds its K, V tile and fp32 dk, dv
               [block_k, head_dim_pad] and walks the q tiles that can see it; each q tile is the
               forward's layout, [positions, group_pad] rows of the group's query heads, so the
               GQA sum over a group's heads happens in the MMA's K dimension: K/V never repeated,
               no cross-program reduction. Transposed products (S^T = K Q^T, as the Triton
               tutorial) keep every operand in the layout it was loaded in.
  dq           grid (q_tile, batch, kv_head), the forward's program shape: walks the kv tiles.
Both loops skip tiles outside the mask and split the rest into masked-below / unmasked /
masked-above ranges like the forward (`triton._kv_tile_ranges`, and its mirror
`_q_tile_ranges` for dk/dv); the two masked ranges run in one loop (`_tile_loops`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._core import compat
from pallas_kernels.ops.attention import config as config_lib
from pallas_kernels.ops.attention import config_bwd
from pallas_kernels.ops.attention.triton import (
    LOG2_E, _and_masks, _cdiv, _dot_precision, _kv_tile_ranges, _load, _store, tiles)

_PRE_ELEMENTS = 8192  # elements of one preprocess block: 128 rows at head_dim 64, 32 at 256


# ---- preprocess: delta = rowsum(dO * O), base-2 lse.

def _preprocess_kernel(o_ref, do_ref, lse_ref, delta_ref, lse2_ref, *, num_rows: int,
                       head_dim: int):
  # o_ref, do_ref: [block_rows, head_dim_pad];  lse_ref, delta_ref, lse2_ref: [block_rows] fp32
  block_rows, head_dim_pad = o_ref.shape
  start = pl.program_id(0) * block_rows
  row_ok = (start + jnp.arange(block_rows) < num_rows) if num_rows % block_rows else None
  dim_ok = (jnp.arange(head_dim_pad) < head_dim) if head_dim_pad != head_dim else None
  mask = _and_masks(None if row_ok is None else row_ok[:, None],
                    None if dim_ok is None else dim_ok[None, :])
  o = _load(o_ref, mask).astype(jnp.float32)
  do = _load(do_ref, mask).astype(jnp.float32)
  _store(delta_ref, jnp.sum(o * do, axis=1), row_ok)
  lse = _load(lse_ref, row_ok)
  _store(lse2_ref, jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E), row_ok)


def _preprocess(o, do, lse, *, interpret: bool):
  """(delta, lse2), fp32 [batch, q_len, num_heads] each."""
  *lead, head_dim = o.shape
  num_rows = o.size // head_dim
  head_dim_pad = config_lib.padded_head_dim(head_dim)
  block_rows = min(max(16, _PRE_ELEMENTS // head_dim_pad), config_lib.next_pow2(num_rows))
  row_block = pl.BlockSpec((block_rows, head_dim_pad), lambda i: (i, 0))
  vec_block = pl.BlockSpec((block_rows,), lambda i: (i,))
  vec = jax.ShapeDtypeStruct((num_rows,), jnp.float32)
  delta, lse2 = pl.pallas_call(
      functools.partial(_preprocess_kernel, num_rows=num_rows, head_dim=head_dim),
      grid=(_cdiv(num_rows, block_rows),),
      in_specs=[row_block, row_block, vec_block],
      out_specs=[vec_block, vec_block],
      out_shape=[vec, vec],
      compiler_params=compat.triton_params(4, 1),
      interpret=interpret,
      name="attention_bwd_preprocess",
  )(o.reshape(num_rows, head_dim), do.reshape(num_rows, head_dim), lse.reshape(num_rows))
  return delta.reshape(lead), lse2.reshape(lead)


# ---- shared pieces of the two gradient kernels.

def _logits(a, b, *, precision, pre: float, post: float | None):
  """(base-2 logits a.b^T, tanh of the softcap or None): a [m, d], b [n, d] -> [m, n] fp32."""
  s = lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  if post is None:
    return s * pre, None
  th = jnp.tanh(s * pre)
  return post * th, th


def _softcap_factors(*, scale: float, softcap: float | None):
  """(pre, post): base-2 logits are `s * pre`, or `post * tanh(s * pre)` with a softcap."""
  if softcap is None:
    return scale * LOG2_E, None
  return scale / softcap, softcap * LOG2_E


def _dot(a, b, precision):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _q_tile_ranges(k_first, length, q_offset, *, block_k: int, positions: int, q_len: int,
                   num_q_tiles: int, causal: bool, window: int | None):
  """(t_lo, t_full_lo, t_full_hi, t_hi): the q tiles that see kv tile [k_first, +block_k).

  Query i (absolute position q_offset + i) sees key j < length when, if causal, j <= position
  and, with a window W, position - W < j. The mirror of `triton._kv_tile_ranges`:
  [t_lo, t_full_lo) masked (diagonal), [t_full_lo, t_full_hi) unmasked, [t_full_hi, t_hi)
  masked (window edge); tiles outside see no key of this tile.
  """
  k_last = k_first + block_k - 1
  k_top = jnp.minimum(k_last, length - 1)  # last key that exists
  i_lo = jnp.clip(k_first - q_offset, 0, q_len) if causal else jnp.int32(0)
  i_hi = jnp.clip(k_top + window - q_offset, 0, q_len) if window is not None else q_len
  i_hi = jnp.where(k_first < length, i_hi, i_lo)  # no key of the tile exists: nothing
  t_lo = i_lo // positions
  t_hi = jnp.where(i_hi > i_lo, jnp.maximum(_cdiv(i_hi, positions), t_lo), t_lo)
  # Unmasked: every key exists, the first query of the tile sees the last key (causal) and
  # the last query sees the first key (window).
  if causal:
    t_full_lo = _cdiv(jnp.clip(k_last - q_offset, 0, q_len), positions)
  else:
    t_full_lo = t_lo
  if window is not None:
    see_first = k_first + window - q_offset  # queries i < see_first see key k_first
    t_full_hi = jnp.where(see_first >= q_len, num_q_tiles,
                          jnp.maximum(see_first, 0) // positions)
  else:
    t_full_hi = t_hi
  full = k_last < length
  t_full_lo = jnp.where(full, jnp.clip(t_full_lo, t_lo, t_hi), t_hi)
  t_full_hi = jnp.where(full, jnp.clip(t_full_hi, t_full_lo, t_hi), t_hi)
  return t_lo, t_full_lo, t_full_hi, t_hi


def _tile_loops(body, carry, t_lo, t_full_lo, t_full_hi, t_hi):
  """`body(t, carry, masked=False)` over the interior [t_full_lo, t_full_hi), then one loop of
  `body(t, carry, masked=True)` over both boundary ranges [t_lo, t_full_lo) and
  [t_full_hi, t_hi). One masked loop, not the forward's two: the kernel carries two loop
  bodies instead of three (less code on the GPU, a third less to compile in interpret mode).
  The carry's last element counts tiles; returns (*carry, unmasked tiles)."""
  carry = lax.fori_loop(t_full_lo, t_full_hi, functools.partial(body, masked=False), carry)
  n_interior = carry[-1]
  n_below = t_full_lo - t_lo

  def masked(i, carry):
    t = jnp.where(i < n_below, t_lo + i, t_full_hi + (i - n_below))
    return body(t, carry, masked=True)
  carry = lax.fori_loop(0, n_below + (t_hi - t_full_hi), masked, carry)
  return (*carry, n_interior)


def _visible(k_pos, row_pos, key_ok, *, causal: bool, window: int | None):
  """May the query at `row_pos` see the key at `k_pos`? Arguments broadcast against each other
  (keys on rows for dk/dv, on columns for dq)."""
  visible = key_ok
  if causal:
    visible = visible & (k_pos <= row_pos)
  if window is not None:
    visible = visible & (k_pos > row_pos - window)
  return visible


# ---- dk/dv: one program per (kv tile, batch, kv head), looping over q tiles.

def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, lengths_ref, q_offset_ref,
                 dk_ref, dv_ref, *count_refs,
                 q_len: int, kv_len: int, group: int, head_dim: int, positions: int,
                 causal: bool, window: int | None, softcap: float | None, scale: float,
                 count_tiles: bool):
  # q_ref, do_ref: [q_tiles * positions, group_pad, head_dim_pad]
  # lse2_ref, delta_ref: [q_tiles * positions, group_pad] fp32
  # k_ref, v_ref, dk_ref, dv_ref: [block_k, head_dim_pad]
  # lengths_ref, q_offset_ref: [] int32;  masked_ref, unmasked_ref: [] int32
  _, group_pad, head_dim_pad = q_ref.shape
  block_k = k_ref.shape[0]
  rows = positions * group_pad
  num_q_tiles = _cdiv(q_len, positions)
  k_first = pl.program_id(0) * block_k
  k_pos = k_first + jnp.arange(block_k)
  length = jnp.clip(lengths_ref[()], 0, kv_len)
  q_offset = q_offset_ref[()]

  group_ok = (jnp.arange(group_pad) < group) if group_pad != group else None
  dim_ok = (jnp.arange(head_dim_pad) < head_dim) if head_dim_pad != head_dim else None
  key_ok = k_pos < length
  # Keys past `length` load as zeros (past kv_len they would be out of bounds).
  k_mask = _and_masks(key_ok[:, None], None if dim_ok is None else dim_ok[None, :])
  k = _load(k_ref, k_mask)  # [block_k, head_dim_pad]
  v = _load(v_ref, k_mask)
  precision = _dot_precision(k.dtype)
  pre, post = _softcap_factors(scale=scale, softcap=softcap)

  def body(t, carry, *, masked: bool):
    dk, dv, n = carry
    q_start = t * positions
    # Positions past q_len exist only in the last tile: a static fact decides whether to mask.
    pos_ok = (q_start + jnp.arange(positions) < q_len) if q_len % positions else None
    row_mask = _and_masks(None if pos_ok is None else pos_ok[:, None],
                          None if group_ok is None else group_ok[None, :])
    tile_mask = _and_masks(None if row_mask is None else row_mask[:, :, None],
                           None if dim_ok is None else dim_ok[None, None, :])
    rows_at = pl.ds(q_start, positions)
    q = _load(q_ref.at[rows_at], tile_mask).reshape(rows, head_dim_pad)
    do = _load(do_ref.at[rows_at], tile_mask).reshape(rows, head_dim_pad)
    # Pad rows: lse2 = +inf makes P = 0 there, so they add nothing to dk or dv.
    lse2 = _load(lse2_ref.at[rows_at], row_mask, other=jnp.inf).reshape(rows)
    delta = _load(delta_ref.at[rows_at], row_mask).reshape(rows)
    s_t, th_t = _logits(k, q, precision=precision, pre=pre, post=post)  # [block_k, rows]
    if masked:
      row_pos = q_offset + q_start + jnp.arange(rows) // group_pad
      visible = _visible(k_pos[:, None], row_pos[None, :], key_ok[:, None], causal=causal,
                         window=window)
      s_t = jnp.where(visible, s_t, -jnp.inf)
    p_t = jnp.exp2(s_t - lse2[None, :])  # [block_k, rows]
    dv = dv + _dot(p_t.astype(do.dtype), do, precision)  # [block_k, head_dim_pad]
    dp_t = lax.dot_general(v, do, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)  # [block_k, rows]
    ds_t = p_t * (dp_t - delta[None, :])
    if th_t is not None:
      ds_t = ds_t * (1.0 - th_t * th_t)
    dk = dk + _dot(ds_t.astype(q.dtype), q, precision)  # [block_k, head_dim_pad]
    return dk, dv, (n + 1) if count_tiles else n

  t_lo, t_full_lo, t_full_hi, t_hi = _q_tile_ranges(
      k_first, length, q_offset, block_k=block_k, positions=positions, q_len=q_len,
      num_q_tiles=num_q_tiles, causal=causal, window=window)
  zeros = jnp.zeros((block_k, head_dim_pad), jnp.float32)
  dk, dv, n, n_interior = _tile_loops(body, (zeros, zeros, jnp.int32(0)), t_lo, t_full_lo,
                                      t_full_hi, t_hi)

  out_mask = _and_masks((k_pos < kv_len)[:, None] if kv_len % block_k else None,
                        None if dim_ok is None else dim_ok[None, :])
  _store(dk_ref, (dk * scale).astype(dk_ref.dtype), out_mask)
  _store(dv_ref, dv.astype(dv_ref.dtype), out_mask)
  if count_tiles:
    masked_ref, unmasked_ref = count_refs
    masked_ref[()] = n - n_interior
    unmasked_ref[()] = n_interior


# ---- dq: one program per (q tile, batch, kv head), looping over kv tiles.

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, lengths_ref, q_offset_ref,
               dq_ref, *count_refs,
               q_len: int, kv_len: int, group: int, head_dim: int, positions: int,
               block_k: int, causal: bool, window: int | None, softcap: float | None,
               scale: float, num_q_tiles: int, count_tiles: bool):
  # q_ref, do_ref, dq_ref: [positions, group_pad, head_dim_pad]
  # lse2_ref, delta_ref: [positions, group_pad] fp32
  # k_ref, v_ref: [kv_tiles * block_k, head_dim_pad]
  # lengths_ref, q_offset_ref: [] int32;  masked_ref, unmasked_ref: [] int32
  _, group_pad, head_dim_pad = q_ref.shape
  rows = positions * group_pad
  q_tile = num_q_tiles - 1 - pl.program_id(0)  # heaviest causal tiles launch first
  q_start = q_tile * positions

  pos_ok = (q_start + jnp.arange(positions) < q_len) if q_len % positions else None
  group_ok = (jnp.arange(group_pad) < group) if group_pad != group else None
  dim_ok = (jnp.arange(head_dim_pad) < head_dim) if head_dim_pad != head_dim else None
  row_mask = _and_masks(None if pos_ok is None else pos_ok[:, None],
                        None if group_ok is None else group_ok[None, :])
  tile_mask = _and_masks(None if row_mask is None else row_mask[:, :, None],
                         None if dim_ok is None else dim_ok[None, None, :])
  q = _load(q_ref, tile_mask).reshape(rows, head_dim_pad)
  do = _load(do_ref, tile_mask).reshape(rows, head_dim_pad)
  lse2 = _load(lse2_ref, row_mask, other=jnp.inf).reshape(rows)
  delta = _load(delta_ref, row_mask).reshape(rows)

  length = jnp.clip(lengths_ref[()], 0, kv_len)
  q_first = q_offset_ref[()] + q_start
  q_last = q_offset_ref[()] + jnp.minimum(q_start + positions, q_len) - 1
  row_pos = q_first + jnp.arange(rows) // group_pad
  t_lo, t_full_lo, t_full_hi, t_hi = _kv_tile_ranges(
      q_first, q_last, length, block_k=block_k, causal=causal, window=window)
  precision = _dot_precision(q.dtype)
  pre, post = _softcap_factors(scale=scale, softcap=softcap)

  def body(t, carry, *, masked: bool):
    dq, n = carry
    k_pos = t * block_k + jnp.arange(block_k)
    key_ok = (k_pos < length) if masked else None
    kv_mask = _and_masks(None if key_ok is None else key_ok[:, None],
                         None if dim_ok is None else dim_ok[None, :])
    k = _load(k_ref.at[pl.ds(t * block_k, block_k), :], kv_mask)  # [block_k, head_dim_pad]
    v = _load(v_ref.at[pl.ds(t * block_k, block_k), :], kv_mask)
    s, th = _logits(q, k, precision=precision, pre=pre, post=post)  # [rows, block_k]
    if masked:
      visible = _visible(k_pos[None, :], row_pos[:, None], key_ok[None, :], causal=causal,
                         window=window)
      s = jnp.where(visible, s, -jnp.inf)
    p = jnp.exp2(s - lse2[:, None])
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)  # [rows, block_k]
    ds = p * (dp - delta[:, None])
    if th is not None:
      ds = ds * (1.0 - th * th)
    dq = dq + _dot(ds.astype(k.dtype), k, precision)  # [rows, head_dim_pad]
    return dq, (n + 1) if count_tiles else n

  dq, n, n_interior = _tile_loops(body, (jnp.zeros((rows, head_dim_pad), jnp.float32),
                                         jnp.int32(0)), t_lo, t_full_lo, t_full_hi, t_hi)

  dq = (dq * scale).reshape(positions, group_pad, head_dim_pad)
  _store(dq_ref, dq.astype(dq_ref.dtype), tile_mask)
  if count_tiles:
    masked_ref, unmasked_ref = count_refs
    masked_ref[()] = n - n_interior
    unmasked_ref[()] = n_interior


# ---- wrapper.

@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale", "cfg",
                                             "interpret", "count_tiles"))
def backward(q, k, v, lengths, q_offset, o, lse, do, *, causal: bool, window: int | None,
             softcap: float | None, scale: float, cfg: config_bwd.AttentionBwdConfig,
             interpret: bool, count_tiles: bool = False):
  """(dq, dk, dv) in the dtypes of q, k, v; with count_tiles also the (masked, unmasked) tile
  counts of the dk/dv programs [batch, kv_heads, kv_tiles] and of the dq programs
  [batch, kv_heads, q_tiles] (tile 0 first)."""
  delta, lse2 = _preprocess(o, do, lse, interpret=interpret)
  dk, dv, *dkdv_counts = _dkdv(q, k, v, do, lse2, delta, lengths, q_offset, causal=causal,
                               window=window, softcap=softcap, scale=scale, cfg=cfg,
                               interpret=interpret, count_tiles=count_tiles)
  dq, *dq_counts = _dq(q, k, v, do, lse2, delta, lengths, q_offset, causal=causal,
                       window=window, softcap=softcap, scale=scale, cfg=cfg,
                       interpret=interpret, count_tiles=count_tiles)
  if count_tiles:
    return dq, dk, dv, tuple(dkdv_counts), tuple(dq_counts)
  return dq, dk, dv


def _grouped(x, num_kv_heads: int):
  """[batch, q_len, num_heads, ...] -> [batch, q_len, num_kv_heads, group, ...] (free)."""
  batch, q_len, num_heads, *rest = x.shape
  return x.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, *rest)


class _Sizes(NamedTuple):
  """The problem's sizes and one gradient kernel's tiles (`tiles`, as the forward's)."""
  batch: int
  q_len: int
  kv_len: int
  num_kv_heads: int
  group: int
  head_dim: int
  head_dim_pad: int
  positions: int  # query positions per q tile
  group_pad: int
  block_k: int    # keys per kv tile


def _sizes(q, k, block_rows: int, block_k: int) -> _Sizes:
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  positions, group_pad, block_k = tiles(block_rows, block_k, q_len=q_len, kv_len=kv_len,
                                        group=group)
  return _Sizes(batch, q_len, kv_len, num_kv_heads, group, head_dim,
                config_lib.padded_head_dim(head_dim), positions, group_pad, block_k)


def _gradient_call(kernel, operands, sz: _Sizes, *, num_tiles: int, q_spec, kv_spec, vec_spec,
                   out_shape, out_specs, count_index_map, num_warps: int, num_stages: int,
                   interpret: bool, name: str):
  """One gradient kernel over grid (tile, batch, kv head). `operands`: q, k, v, dO, lse2, delta
  (the q-shaped ones passed grouped, `_grouped`), lengths, q_offset. With `count_index_map`, two
  more outputs: the masked and unmasked tile counts [batch, kv_heads, num_tiles]."""
  q, k, v, do, lse2, delta, lengths, q_offset = operands
  if count_index_map is not None:
    count = jax.ShapeDtypeStruct((sz.batch, sz.num_kv_heads, num_tiles), jnp.int32)
    count_spec = pl.BlockSpec((pl.squeezed,) * 3, count_index_map)
    out_shape, out_specs = [*out_shape, count, count], [*out_specs, count_spec, count_spec]
  row_spec = pl.BlockSpec((pl.squeezed,), lambda t, b, h: (b,))
  return pl.pallas_call(
      kernel,
      grid=(num_tiles, sz.batch, sz.num_kv_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, row_spec, row_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_params(num_warps, num_stages),
      interpret=interpret,
      name=name,
  )(_grouped(q, sz.num_kv_heads), k, v, _grouped(do, sz.num_kv_heads),
    _grouped(lse2, sz.num_kv_heads), _grouped(delta, sz.num_kv_heads), lengths, q_offset)


def _dkdv(q, k, v, do, lse2, delta, lengths, q_offset, *, causal, window, softcap, scale, cfg,
          interpret, count_tiles):
  sz = _sizes(q, k, cfg.block_q_dkv, cfg.block_k_dkv)
  num_kv_tiles = _cdiv(sz.kv_len, sz.block_k)
  q_rows = _cdiv(sz.q_len, sz.positions) * sz.positions  # the q sequence, padded to whole tiles
  sq = pl.squeezed
  # The whole q sequence of the program's group (all its query heads); the kernel walks it.
  seq_spec = pl.BlockSpec((sq, q_rows, sq, sz.group_pad, sz.head_dim_pad),
                          lambda j, b, h: (b, 0, h, 0, 0))
  vec_spec = pl.BlockSpec((sq, q_rows, sq, sz.group_pad), lambda j, b, h: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((sq, sz.block_k, sq, sz.head_dim_pad), lambda j, b, h: (b, j, h, 0))
  kernel = functools.partial(
      _dkdv_kernel, q_len=sz.q_len, kv_len=sz.kv_len, group=sz.group, head_dim=sz.head_dim,
      positions=sz.positions, causal=causal, window=window, softcap=softcap, scale=scale,
      count_tiles=count_tiles)
  return _gradient_call(
      kernel, (q, k, v, do, lse2, delta, lengths, q_offset), sz,
      num_tiles=num_kv_tiles,  # causal: kv tile 0, the heaviest, first
      q_spec=seq_spec, kv_spec=kv_spec, vec_spec=vec_spec,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      out_specs=[kv_spec, kv_spec],
      count_index_map=(lambda j, b, h: (b, h, j)) if count_tiles else None,
      num_warps=cfg.num_warps_dkv, num_stages=cfg.num_stages_dkv, interpret=interpret,
      name="attention_bwd_dkdv")


def _dq(q, k, v, do, lse2, delta, lengths, q_offset, *, causal, window, softcap, scale, cfg,
        interpret, count_tiles):
  sz = _sizes(q, k, cfg.block_q_dq, cfg.block_k_dq)
  num_q_tiles = _cdiv(sz.q_len, sz.positions)
  last = num_q_tiles - 1
  sq = pl.squeezed
  q_spec = pl.BlockSpec((sq, sz.positions, sq, sz.group_pad, sz.head_dim_pad),
                        lambda i, b, h: (b, last - i, h, 0, 0))
  vec_spec = pl.BlockSpec((sq, sz.positions, sq, sz.group_pad),
                          lambda i, b, h: (b, last - i, h, 0))
  kv_spec = pl.BlockSpec((sq, _cdiv(sz.kv_len, sz.block_k) * sz.block_k, sq, sz.head_dim_pad),
                         lambda i, b, h: (b, 0, h, 0))
  kernel = functools.partial(
      _dq_kernel, q_len=sz.q_len, kv_len=sz.kv_len, group=sz.group, head_dim=sz.head_dim,
      positions=sz.positions, block_k=sz.block_k, causal=causal, window=window, softcap=softcap,
      scale=scale, num_q_tiles=num_q_tiles, count_tiles=count_tiles)
  dq, *counts = _gradient_call(
      kernel, (q, k, v, do, lse2, delta, lengths, q_offset), sz,
      num_tiles=num_q_tiles, q_spec=q_spec, kv_spec=kv_spec, vec_spec=vec_spec,
      out_shape=[jax.ShapeDtypeStruct(_grouped(q, sz.num_kv_heads).shape, q.dtype)],
      out_specs=[q_spec],
      count_index_map=(lambda i, b, h: (b, h, last - i)) if count_tiles else None,
      num_warps=cfg.num_warps_dq, num_stages=cfg.num_stages_dq, interpret=interpret,
      name="attention_bwd_dq")
  return (dq.reshape(q.shape), *counts)
