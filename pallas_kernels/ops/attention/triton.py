"""FlashAttention-2 forward in Pallas, lowered through Triton (Ampere and Hopper).

Grid (q_tile, batch, kv_head). One program owns one kv head and a tile of `positions` query
positions of *all* `group` query heads that share it: the q tile is [positions, group_pad,
head_dim_pad], flattened to `rows = positions * group_pad` MMA rows. Every K/V tile is thus
loaded once per group (GQA/MQA never repeat K/V, neither in HBM nor in the loop), and a small
group still fills the MMA's M dimension with more positions. group is padded to a power of
two (Triton tiles must be), so SmolLM2's group of 3 wastes a quarter of its rows; the pad
rows are zeros, masked on load and store.

The kv loop is split into three ranges computed from the q tile's first and last absolute
position (causal, sliding window) and the batch row's length:
  [t_lo, t_full_lo)       boundary tiles below: window edge, masked
  [t_full_lo, t_full_hi)  interior tiles: every key visible to every row, no mask at all
  [t_full_hi, t_hi)       boundary tiles above: diagonal / length edge, masked
Tiles outside [t_lo, t_hi) are never loaded or computed.

Online softmax in base 2 (log2(e) folded into the scale) with fp32 statistics and fp32
accumulation. Masked logits are -inf, and the running max is read as 0 while a row has seen
no key, so such a row keeps l = 0 and its output is written as zeros (its lse is -inf).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._core import compat
from pallas_kernels.ops.attention import config as config_lib

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
MAX_HEAD_DIM = 256


def _cdiv(a, b: int):
  return (a + b - 1) // b


def _kv_tile_ranges(q_first, q_last, length, *, block_k: int, causal: bool, window: int | None):
  """(t_lo, t_full_lo, t_full_hi, t_hi): the kv tiles this q tile visits, split by mask need.

  q_first/q_last: absolute positions of the tile's first and last real query; length: keys
  at positions >= length do not exist for this batch row.
  """
  hi = jnp.minimum(length, q_last + 1) if causal else length  # keys [lo, hi) may be visible
  lo = jnp.maximum(q_first - window + 1, 0) if window is not None else jnp.int32(0)
  t_lo = lo // block_k
  # hi <= lo: no key at all (e.g. the length lies below the window); not even one masked tile.
  t_hi = jnp.where(hi > lo, jnp.maximum(_cdiv(hi, block_k), t_lo), t_lo)
  # A tile needs no mask when its first key is visible to the last row (window) and its last
  # key is visible to the first row (causal) and exists (length).
  full_lo = jnp.maximum(q_last - window + 1, 0) if window is not None else lo
  full_hi = jnp.minimum(length, q_first + 1) if causal else length
  t_full_lo = jnp.clip(_cdiv(full_lo, block_k), t_lo, t_hi)
  t_full_hi = jnp.clip(full_hi // block_k, t_full_lo, t_hi)
  return t_lo, t_full_lo, t_full_hi, t_hi


def _attention_kernel(q_ref, k_ref, v_ref, lengths_ref, q_offset_ref,  # inputs
                      o_ref, *rest_refs,  # outputs: o, then lse and tile counts when asked
                      q_len: int, kv_len: int, group: int, head_dim: int, positions: int,
                      block_k: int, causal: bool, window: int | None, softcap: float | None,
                      scale: float, num_q_tiles: int, return_lse: bool, count_tiles: bool):
  # q_ref, o_ref: [positions, group_pad, head_dim_pad]
  # k_ref, v_ref: [kv_tiles * block_k, head_dim_pad]
  # lengths_ref, q_offset_ref: [] int32
  # lse_ref: [positions, group_pad] fp32;  masked_ref, unmasked_ref: [] int32
  lse_ref = rest_refs[0] if return_lse else None
  count_refs = rest_refs[-2:] if count_tiles else None
  _, group_pad, head_dim_pad = q_ref.shape
  rows = positions * group_pad
  q_tile = num_q_tiles - 1 - pl.program_id(0)  # heaviest causal tiles launch first
  q_start = q_tile * positions  # index of the tile's first query in q

  # Static facts decide which masks exist at all: padding only where shapes are ragged.
  pos_ok = (q_start + jnp.arange(positions) < q_len) if q_len % positions else None
  group_ok = (jnp.arange(group_pad) < group) if group_pad != group else None
  dim_ok = (jnp.arange(head_dim_pad) < head_dim) if head_dim_pad != head_dim else None
  tile_mask = _and_masks(
      None if pos_ok is None else pos_ok[:, None, None],
      None if group_ok is None else group_ok[None, :, None],
      None if dim_ok is None else dim_ok[None, None, :])

  q = _load(q_ref, tile_mask).reshape(rows, head_dim_pad)  # [rows, head_dim_pad]
  length = jnp.clip(lengths_ref[()], 0, kv_len)
  q_first = q_offset_ref[()] + q_start
  q_last = q_offset_ref[()] + jnp.minimum(q_start + positions, q_len) - 1
  row_pos = q_first + jnp.arange(rows) // group_pad  # absolute position of each row
  t_lo, t_full_lo, t_full_hi, t_hi = _kv_tile_ranges(
      q_first, q_last, length, block_k=block_k, causal=causal, window=window)

  precision = _dot_precision(q.dtype)
  if softcap is None:
    pre, post = scale * LOG2_E, None
  else:  # c * tanh(s * scale / c), in base 2
    pre, post = scale / softcap, softcap * LOG2_E

  def body(t, carry, *, masked: bool):
    acc, m_prev, l_prev, n = carry
    k_pos = t * block_k + jnp.arange(block_k)
    key_ok = (k_pos < length) if masked else None
    kv_mask = _and_masks(None if key_ok is None else key_ok[:, None],
                         None if dim_ok is None else dim_ok[None, :])
    k = _load(k_ref.at[pl.ds(t * block_k, block_k), :], kv_mask)  # [block_k, head_dim_pad]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)  # [rows, block_k]
    s = s * pre if post is None else post * jnp.tanh(s * pre)
    if masked:
      visible = key_ok[None, :]
      if causal:
        visible = visible & (k_pos[None, :] <= row_pos[:, None])
      if window is not None:
        visible = visible & (k_pos[None, :] > row_pos[:, None] - window)
      s = jnp.where(visible, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_base = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
    alpha = jnp.exp2(m_prev - m_base)
    p = jnp.exp2(s - m_base[:, None])
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    v = _load(v_ref.at[pl.ds(t * block_k, block_k), :], kv_mask)  # [block_k, head_dim_pad]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)  # [rows, head_dim_pad]
    return acc * alpha[:, None] + pv, m_next, l_next, (n + 1) if count_tiles else n

  carry = (jnp.zeros((rows, head_dim_pad), jnp.float32),
           jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32), jnp.int32(0))
  masked_body = functools.partial(body, masked=True)
  carry = lax.fori_loop(t_lo, t_full_lo, masked_body, carry)
  n_below = carry[3]
  carry = lax.fori_loop(t_full_lo, t_full_hi, functools.partial(body, masked=False), carry)
  n_interior = carry[3] - n_below
  acc, m, l, n = lax.fori_loop(t_full_hi, t_hi, masked_body, carry)

  seen = l > 0
  o = acc * jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)[:, None]
  _store(o_ref, o.reshape(positions, group_pad, head_dim_pad).astype(o_ref.dtype), tile_mask)
  if return_lse:
    lse = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * LN_2, -jnp.inf)
    _store(lse_ref, lse.reshape(positions, group_pad),
           _and_masks(None if pos_ok is None else pos_ok[:, None],
                      None if group_ok is None else group_ok[None, :]))
  if count_tiles:
    masked_ref, unmasked_ref = count_refs
    masked_ref[()] = n - n_interior
    unmasked_ref[()] = n_interior


def _dot_precision(dtype):
  """bf16/fp16: tensor cores, fp32 accumulation. fp32: IEEE fp32 (no silent TF32 rounding)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _and_masks(*masks):
  present = [m for m in masks if m is not None]
  return functools.reduce(lambda a, b: a & b, present) if present else None


def _load(ref, mask, other=0):
  if mask is None:
    return ref[...]
  return plgpu.load(ref, mask=mask, other=other)


def _store(ref, value, mask):
  if mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=mask)


def refuses(q, k, v, *, config=None, **kwargs) -> str | None:
  if config is not None and not isinstance(config, config_lib.AttentionConfig):
    return f"impl='triton' takes an AttentionConfig, got config={type(config).__name__}"
  if q.shape[-1] > MAX_HEAD_DIM:
    return (f"the Triton kernel supports head_dim <= {MAX_HEAD_DIM} (registers), "
            f"got {q.shape[-1]}")
  return None


def tile_shape(cfg: config_lib.AttentionConfig, *, q_len: int, kv_len: int, group: int):
  """(positions per q tile, group_pad, block_k) actually used for these shapes."""
  return tiles(cfg.block_q, cfg.block_k, q_len=q_len, kv_len=kv_len, group=group)


def tiles(block_rows: int, block_k: int, *, q_len: int, kv_len: int, group: int):
  """(positions, group_pad, block_k) for a q tile of `block_rows` rows and a kv tile of
  `block_k` keys, shrunk to short sequences (the backward kernels share this)."""
  group_pad = config_lib.next_pow2(group)
  positions = max(1, block_rows // group_pad)
  positions = min(positions, config_lib.next_pow2(q_len))
  while positions * group_pad < 16:  # MMA rows: at least 16
    positions *= 2
  block_k = min(block_k, max(16, config_lib.next_pow2(kv_len)))
  return positions, group_pad, block_k


def attention(q, k, v, *, causal: bool = True, lengths=None, q_offset=None,
              sliding_window: int | None = None, logit_softcap: float | None = None,
              scale: float | None = None, config: config_lib.AttentionConfig | None = None,
              interpret: bool = False, return_lse: bool = False, count_tiles: bool = False):
  """The Triton-path attention. Arguments are checked by `api.attention`.

  return_lse: also return the natural-log log-sum-exp of each row's logits, fp32
    [batch, q_len, num_heads] (-inf for a row that sees no key); the backward pass uses it.
  count_tiles: also return int32 [batch, num_kv_heads, num_q_tiles] counts of masked and
    unmasked kv tiles each program computed (q tile 0 first); proves the block skipping.
  """
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  cfg = config_lib.resolve(config, head_dim=head_dim, dtype=q.dtype, causal=causal,
                           q_len=q_len, kv_len=kv_len)
  if lengths is None:
    lengths = jnp.full((batch,), kv_len, jnp.int32)
  if q_offset is None:
    q_offset = jnp.full((batch,), kv_len - q_len, jnp.int32)
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  return _attention(q, k, v, lengths, q_offset, causal=causal, window=sliding_window,
                    softcap=None if logit_softcap is None else float(logit_softcap),
                    scale=scale, cfg=cfg, interpret=interpret, return_lse=return_lse,
                    count_tiles=count_tiles)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale", "cfg",
                                             "interpret", "return_lse", "count_tiles"))
def _attention(q, k, v, lengths, q_offset, *, causal, window, softcap, scale, cfg, interpret,
               return_lse, count_tiles):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  positions, group_pad, block_k = tile_shape(cfg, q_len=q_len, kv_len=kv_len, group=group)
  head_dim_pad = config_lib.padded_head_dim(head_dim)
  num_q_tiles = _cdiv(q_len, positions)
  last = num_q_tiles - 1

  kernel = functools.partial(
      _attention_kernel, q_len=q_len, kv_len=kv_len, group=group, head_dim=head_dim,
      positions=positions, block_k=block_k, causal=causal, window=window, softcap=softcap,
      scale=scale, num_q_tiles=num_q_tiles, return_lse=return_lse, count_tiles=count_tiles)
  sq = pl.squeezed
  # q and o as [batch, q_len, num_kv_heads, group, head_dim]: a free reshape that makes each
  # program's query heads one block. Blocks wider than the array (group_pad, head_dim_pad, the
  # last q tile) are masked in the kernel.
  q_spec = pl.BlockSpec((sq, positions, sq, group_pad, head_dim_pad),
                        lambda i, b, h: (b, last - i, h, 0, 0))
  # The whole (tile-padded) sequence of one kv head; the kernel walks it tile by tile.
  kv_spec = pl.BlockSpec((sq, _cdiv(kv_len, block_k) * block_k, sq, head_dim_pad),
                         lambda i, b, h: (b, 0, h, 0))
  row_spec = pl.BlockSpec((sq,), lambda i, b, h: (b,))
  out_shape = [jax.ShapeDtypeStruct((batch, q_len, num_kv_heads, group, head_dim), q.dtype)]
  out_specs = [q_spec]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((batch, q_len, num_kv_heads, group), jnp.float32))
    out_specs.append(pl.BlockSpec((sq, positions, sq, group_pad),
                                  lambda i, b, h: (b, last - i, h, 0)))
  if count_tiles:
    count_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, num_q_tiles), jnp.int32)
    count_spec = pl.BlockSpec((sq, sq, sq), lambda i, b, h: (b, h, last - i))
    out_shape += [count_shape, count_shape]
    out_specs += [count_spec, count_spec]

  outs = pl.pallas_call(
      kernel,
      grid=(num_q_tiles, batch, num_kv_heads),
      in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="attention_fwd",
  )(q.reshape(batch, q_len, num_kv_heads, group, head_dim), k, v, lengths, q_offset)
  o = outs[0].reshape(batch, q_len, num_heads, head_dim)
  extra = []
  if return_lse:
    extra.append(outs[1].reshape(batch, q_len, num_heads))
  if count_tiles:
    extra.append((outs[-2], outs[-1]))
  return (o, *extra) if extra else o
