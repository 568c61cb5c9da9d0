"""Flash-decoding through Pallas/Triton: a split-K kernel and an exact log-sum-exp combine.

Phase 1, grid (batch, num_kv_heads, num_splits). One program owns one KV head of one sequence
and one contiguous range of key blocks. It loads the GQA group's queries once (padded to 16 rows,
the smallest tl.dot tile), streams its K/V range in tiles of `block_k` rows, each tile read once
for the whole group, and keeps an fp32 online softmax. It writes the unnormalized partial output
o, the running max m and the running sum l for every (padded) query row.

The split ranges are computed in the kernel from the runtime `lengths`: the visible blocks
`[lo // block_k, cdiv(hi, block_k))` are divided evenly over the splits, so a short sequence in a
long cache still uses all its splits and blocks outside the visible range (beyond `lengths`, or
before the sliding window) are never loaded. A split left without blocks (lengths = 0, or fewer
blocks than splits) writes o = 0, m = -inf, l = 0, which the combine gives weight exactly 0.

Phase 2 is a jnp epilogue that XLA fuses into one small reduction over the splits: the partials
are at most a few MB (num_splits x group x head_dim fp32 per KV head) next to hundreds of MB of
K/V, and a second Pallas kernel would only add code, not speed. Its weights exp(m_s - max_s m_s)
are 0 for empty splits and it outputs 0 for a row with nothing visible, never NaN.
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
from pallas_kernels._core import config as config_lib
from pallas_kernels.ops.decode_attention import config as cfg
from pallas_kernels.ops.decode_attention.config import DecodeAttentionConfig

OP = "decode_attention"
MIN_GROUP_ROWS = 16  # tl.dot needs M >= 16: the group's query rows are padded up to this
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256   # a [16, head_dim] fp32 accumulator plus K/V tiles per program; beyond, spills


def refuses(q, k_cache, v_cache, lengths, **kwargs) -> str | None:
  del v_cache, lengths, kwargs
  head_dim = q.shape[-1]
  if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
    return f"head_dim {head_dim} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the Triton kernel"
  group = q.shape[1] // k_cache.shape[2]
  if cfg.next_power_of_2(max(group, MIN_GROUP_ROWS)) > 128:
    return f"GQA group of {group} query heads per KV head exceeds 128 rows per program"
  return None


def _prefix_mask(size: int, valid: int):
  """`iota < valid` over `size` rows (or columns), or None when all are valid: no masking."""
  return None if size == valid else jnp.arange(size) < valid


def _and(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def load_group_queries(q_ref, *, group: int, head_dim: int):
  """q `[group_rows, head_pad]` with zeros in the padding, and the masks of its valid rows,
  columns and elements (each None when nothing is padded)."""
  group_rows, head_pad = q_ref.shape
  row_mask = _prefix_mask(group_rows, group)
  col_mask = _prefix_mask(head_pad, head_dim)
  q_mask = _and(None if row_mask is None else row_mask[:, None],
                None if col_mask is None else col_mask[None, :])
  q = plgpu.load(q_ref, mask=q_mask, other=0.0 if q_mask is not None else None)
  return q, row_mask, col_mask, q_mask


def split_blocks(length, capacity: int, *, sliding_window: int | None, block_k: int,
                 num_splits: int):
  """The visible key rows [lo, hi) and the blocks [start, stop) of them this split owns."""
  hi = jnp.clip(length, 0, capacity)
  lo = jnp.int32(0) if sliding_window is None else jnp.maximum(hi - sliding_window, 0)
  first_block = lo // block_k
  num_blocks = jnp.maximum(pl.cdiv(hi, block_k) - first_block, 0)
  blocks_per_split = pl.cdiv(num_blocks, num_splits)
  start = jnp.minimum(first_block + pl.program_id(2) * blocks_per_split,
                      first_block + num_blocks)
  stop = jnp.minimum(start + blocks_per_split, first_block + num_blocks)
  return lo, hi, start, stop


def empty_partials(group_rows: int, head_pad: int):
  """The online softmax's (acc, m, l) before any block: a split left empty writes these."""
  return (jnp.zeros((group_rows, head_pad), jnp.float32),
          jnp.full((group_rows,), -jnp.inf, jnp.float32),
          jnp.zeros((group_rows,), jnp.float32))


def partial_outputs(partial_shape: tuple[int, ...], *, group_rows: int, head_dim: int,
                    head_pad: int):
  """out_specs and out_shape of the split kernel's (o, m, l) over grid (batch, kv_head, split);
  partial_shape is (batch, num_kv_heads, num_splits, group)."""
  out_specs = [
      pl.BlockSpec((None, None, None, group_rows, head_pad), lambda b, h, s: (b, h, s, 0, 0)),
      pl.BlockSpec((None, None, None, group_rows), lambda b, h, s: (b, h, s, 0)),
      pl.BlockSpec((None, None, None, group_rows), lambda b, h, s: (b, h, s, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
      jax.ShapeDtypeStruct(partial_shape, jnp.float32),
      jax.ShapeDtypeStruct(partial_shape, jnp.float32),
  ]
  return out_specs, out_shape


def attend_block(q, k, load_v, visible, carry, *, scale: float, logit_softcap: float | None):
  """One key block of the online softmax; also the paged kernel's (its K/V come from pages).

  q `[group_rows, head_pad]`, k `[block_k, head_pad]` (invisible rows already zero: loaded
  masked); `load_v()` loads the V tile, called after the scores as the kernel always did (the
  order its audit figures were measured with); visible `[block_k]`, with at least one True.
  carry (acc, m, l) -> the new one.
  """
  acc, m, l = carry
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32)  # [group_rows, block_k]
  s = s * scale
  if logit_softcap is not None:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  s = jnp.where(visible[None, :], s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: the block has a visible key
  alpha = jnp.exp(m - m_new)                 # exp(-inf) = 0 on the first block
  p = jnp.exp(s - m_new[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  v = load_v()                               # [block_k, head_pad]
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)  # [group_rows, head_pad]
  return alpha[:, None] * acc + pv, m_new, l


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                   scale: float, logit_softcap: float | None, sliding_window: int | None,
                   block_k: int, num_splits: int, group: int, head_dim: int, max_len: int):
  # lengths_ref: []                        this sequence's length
  # q_ref:       [group_rows, head_pad]    the GQA group's queries (rows >= group are padding)
  # k_ref/v_ref: [max_len, head_pad]       this sequence's cache for this KV head
  # o_ref:       [group_rows, head_pad]    unnormalized partial output of this split
  # m_ref/l_ref: [group_rows]              running max / running sum of this split
  group_rows, head_pad = q_ref.shape
  q, row_mask, col_mask, q_mask = load_group_queries(q_ref, group=group, head_dim=head_dim)
  lo, hi, start, stop = split_blocks(lengths_ref[()], max_len, sliding_window=sliding_window,
                                     block_k=block_k, num_splits=num_splits)

  def body(block, carry):
    pos = block * block_k + jnp.arange(block_k)
    visible = (pos >= lo) & (pos < hi)  # [block_k]; every loaded block has one visible key
    kv_mask = _and(visible[:, None], None if col_mask is None else col_mask[None, :])
    rows = pl.ds(pl.multiple_of(block * block_k, block_k), block_k)
    # Masked loads: rows outside [lo, hi) are never read, so NaN or stale data there cannot
    # leak (0 * NaN would), and the last block may run past max_len.
    k = plgpu.load(k_ref.at[rows], mask=kv_mask, other=0.0)  # [block_k, head_pad]
    load_v = lambda: plgpu.load(v_ref.at[rows], mask=kv_mask, other=0.0)
    return attend_block(q, k, load_v, visible, carry, scale=scale, logit_softcap=logit_softcap)

  acc, m, l = lax.fori_loop(start, stop, body, empty_partials(group_rows, head_pad))

  plgpu.store(o_ref, acc, mask=q_mask)
  plgpu.store(m_ref, m, mask=row_mask)
  plgpu.store(l_ref, l, mask=row_mask)


def combine(o, m, l):
  """Exact merge of split partials. o `[..., splits, group, head_dim]`, m/l `[..., splits, group]`.

  out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s with M = max_s m_s; an empty split has
  m_s = -inf (weight 0) and a row whose splits are all empty outputs 0.
  """
  m_max = jnp.max(m, axis=-2, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0)
  weight = jnp.exp(m - m_max)                           # [..., splits, group]
  l_total = jnp.sum(weight * l, axis=-2)                # [..., group]
  o_total = jnp.sum(weight[..., None] * o, axis=-3)     # [..., group, head_dim]
  safe_l = jnp.where(l_total > 0, l_total, 1)[..., None]
  return jnp.where(l_total[..., None] > 0, o_total / safe_l, 0)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap",
                                             "config", "interpret"))
def _forward(q, k_cache, v_cache, lengths, *, scale: float, sliding_window: int | None,
             logit_softcap: float | None, config: DecodeAttentionConfig, interpret: bool):
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  group_rows = cfg.next_power_of_2(max(group, MIN_GROUP_ROWS))
  head_pad = cfg.next_power_of_2(head_dim)
  # A split with no block inside max_len would always be empty: don't launch it.
  num_splits = min(config.num_splits, cfg.cdiv(max_len, config.block_k))

  kernel = functools.partial(
      _decode_kernel, scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window,
      block_k=config.block_k, num_splits=num_splits, group=group, head_dim=head_dim,
      max_len=max_len)
  qg = q.reshape(batch, num_kv_heads, group, head_dim)
  out_specs, out_shape = partial_outputs((batch, num_kv_heads, num_splits, group),
                                        group_rows=group_rows, head_dim=head_dim,
                                        head_pad=head_pad)
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None,), lambda b, h, s: (b,)),
          pl.BlockSpec((None, None, group_rows, head_pad), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, max_len, None, head_pad), lambda b, h, s: (b, 0, h, 0)),
          pl.BlockSpec((None, max_len, None, head_pad), lambda b, h, s: (b, 0, h, 0)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_params(config.num_warps, config.num_stages),
      interpret=interpret,
      name="decode_attention_split",
  )(lengths, qg, k_cache, v_cache)
  out = combine(o, m, l)  # [batch, num_kv_heads, group, head_dim]
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def resolve_config(q, k_cache, config: DecodeAttentionConfig | None) -> DecodeAttentionConfig:
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  key = cfg.tuning_key(head_dim=head_dim, dtype=q.dtype, group=num_heads // num_kv_heads,
                       num_kv_heads=num_kv_heads, max_len=max_len, batch=batch)
  heuristic = functools.partial(cfg.heuristic, batch=batch, num_kv_heads=num_kv_heads,
                                max_len=max_len, head_dim=head_dim, dtype=q.dtype)
  return config_lib.resolve(DecodeAttentionConfig, config, cfg.OP_DIR, key, heuristic)


def decode_attention(q, k_cache, v_cache, lengths, *, scale: float | None = None,
                     sliding_window: int | None = None, logit_softcap: float | None = None,
                     config: DecodeAttentionConfig | None = None, interpret: bool = False):
  """The Triton implementation; arguments are checked by `api.decode_attention`."""
  config = resolve_config(q, k_cache, config)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  sliding_window = None if sliding_window is None else int(sliding_window)
  return _forward(q, k_cache, v_cache, lengths, scale=scale, sliding_window=sliding_window,
                  logit_softcap=None if logit_softcap is None else float(logit_softcap),
                  config=config, interpret=interpret)
