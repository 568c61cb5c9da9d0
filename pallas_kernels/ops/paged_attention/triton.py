"""Paged flash-decoding through Pallas/Triton: decode attention's split-K kernel, with every
K/V block gathered from the page pool through the block table inside the kernel.

Grid (batch, num_kv_heads, num_splits), as in decode attention (see its triton.py for the
online softmax, the split ranges and the combine, which is shared). What differs is where a
block's rows come from. The kernel sees, for its KV head, the page pool as rows
`[num_pages * page_size, head_pad]` (a free reshape of the pages: a page is `page_size`
consecutive rows) and its sequence's block-table row `[max_pages]`. For the `block_k` logical
positions of a block it loads the table entries of their pages (a gather of a few int32 that
stay in L1), then gathers the K and V rows `page * page_size + pos % page_size`. So a block
spans several small pages or part of a large one, `block_k` is free of `page_size`, and nothing
is copied into a dense cache. Rows outside `[lo, hi)` are masked in both gathers: the table
entries past a sequence's length and the pages they name are never read.
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
from pallas_kernels.ops.decode_attention import config as decode_cfg
from pallas_kernels.ops.decode_attention import triton as decode_triton
from pallas_kernels.ops.paged_attention import config as cfg
from pallas_kernels.ops.paged_attention.config import PagedAttentionConfig

OP = "paged_attention"


def refuses(q, k_pages, v_pages, block_tables, lengths, **kwargs) -> str | None:
  """Decode attention's limits (head_dim, GQA group rows) apply unchanged."""
  del v_pages, block_tables, lengths, kwargs
  return decode_triton.refuses(q, k_pages, None, None)


def _visible(block, *, lo, hi, block_k: int):
  pos = block * block_k + jnp.arange(block_k)
  return (pos >= lo) & (pos < hi)  # [block_k]


def _block_rows(table_ref, block, *, lo, hi, block_k: int, page_size: int, num_pages: int):
  """Pool rows `[block_k]` of the positions of `block`: `page * page_size + pos % page_size`.

  Only the table entries of visible positions are read (the others may be garbage, or past the
  table for the block after the last). Slots and page ids are clamped in range, so no address
  is ever out of bounds, even for a masked lane or a bad entry.
  """
  max_pages = table_ref.shape[0]
  pos = block * block_k + jnp.arange(block_k)
  slot = jnp.minimum(lax.div(pos, page_size), max_pages - 1)  # pos >= 0: div is floor
  visible = _visible(block, lo=lo, hi=hi, block_k=block_k)
  page = plgpu.load(table_ref.at[slot], mask=visible, other=0)  # [block_k] int32
  return jnp.clip(page, 0, num_pages - 1) * page_size + lax.rem(pos, page_size)


def _paged_kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                  scale: float, logit_softcap: float | None, sliding_window: int | None,
                  block_k: int, num_splits: int, group: int, head_dim: int, page_size: int):
  # lengths_ref: []                              this sequence's length
  # table_ref:   [max_pages]                     this sequence's block-table row
  # q_ref:       [group_rows, head_pad]          the GQA group's queries (rows >= group: padding)
  # k_ref/v_ref: [num_pages * page_size, head_pad]  every page's rows, this KV head
  # o_ref:       [group_rows, head_pad]          unnormalized partial output of this split
  # m_ref/l_ref: [group_rows]                    running max / running sum of this split
  group_rows, head_pad = q_ref.shape
  num_pages = k_ref.shape[0] // page_size
  cols = jnp.arange(head_pad)[None, :]
  q, row_mask, col_mask, q_mask = decode_triton.load_group_queries(q_ref, group=group,
                                                                   head_dim=head_dim)
  # Positions past the table's capacity do not exist: lengths are clamped to it.
  lo, hi, start, stop = decode_triton.split_blocks(
      lengths_ref[()], table_ref.shape[0] * page_size, sliding_window=sliding_window,
      block_k=block_k, num_splits=num_splits)

  block_rows = functools.partial(_block_rows, table_ref, lo=lo, hi=hi, block_k=block_k,
                                 page_size=page_size, num_pages=num_pages)

  def body(block, carry):
    *carry, rows = carry
    visible = _visible(block, lo=lo, hi=hi, block_k=block_k)
    kv_mask = decode_triton._and(visible[:, None],
                                 None if col_mask is None else col_mask[None, :])
    # Two index arrays, not rows and a slice: interpret mode only gathers with arrays alone.
    tile = (rows[:, None], cols)
    k = plgpu.load(k_ref.at[tile], mask=kv_mask, other=0.0)  # [block_k, head_pad]
    load_v = lambda: plgpu.load(v_ref.at[tile], mask=kv_mask, other=0.0)
    carry = decode_triton.attend_block(q, k, load_v, visible, carry, scale=scale,
                                       logit_softcap=logit_softcap)
    # The next block's rows, from its table entries: carried, so that the K/V loads of a
    # block do not wait on a table load in the same iteration. Triton then pipelines them
    # `num_stages - 1` deep like dense decode (with the table load in the same iteration it
    # kept one K/V buffer whatever num_stages: 38 KB of shared memory at 2, 3 and 4 stages).
    return *carry, block_rows(block + 1)

  carry = (*decode_triton.empty_partials(group_rows, head_pad), block_rows(start))
  acc, m, l, _ = lax.fori_loop(start, stop, body, carry)

  plgpu.store(o_ref, acc, mask=q_mask)
  plgpu.store(m_ref, m, mask=row_mask)
  plgpu.store(l_ref, l, mask=row_mask)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap",
                                             "config", "interpret"))
def _forward(q, k_pages, v_pages, block_tables, lengths, *, scale: float,
             sliding_window: int | None, logit_softcap: float | None,
             config: PagedAttentionConfig, interpret: bool):
  batch, num_heads, head_dim = q.shape
  num_pages, page_size, num_kv_heads, _ = k_pages.shape
  group = num_heads // num_kv_heads
  group_rows = decode_cfg.next_power_of_2(max(group, decode_triton.MIN_GROUP_ROWS))
  head_pad = decode_cfg.next_power_of_2(head_dim)
  pool_rows = num_pages * page_size
  # A split with no block inside the table's capacity would always be empty: don't launch it.
  num_splits = min(config.num_splits,
                   decode_cfg.cdiv(cfg.capacity(block_tables, page_size), config.block_k))

  kernel = functools.partial(
      _paged_kernel, scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window,
      block_k=config.block_k, num_splits=num_splits, group=group, head_dim=head_dim,
      page_size=page_size)
  qg = q.reshape(batch, num_kv_heads, group, head_dim)
  out_specs, out_shape = decode_triton.partial_outputs(
      (batch, num_kv_heads, num_splits, group), group_rows=group_rows, head_dim=head_dim,
      head_pad=head_pad)
  pool_spec = pl.BlockSpec((pool_rows, None, head_pad), lambda b, h, s: (0, h, 0))
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None,), lambda b, h, s: (b,)),
          pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, s: (b, 0)),
          pl.BlockSpec((None, None, group_rows, head_pad), lambda b, h, s: (b, h, 0, 0)),
          pool_spec,
          pool_spec,
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_params(config.num_warps, config.num_stages),
      interpret=interpret,
      name="paged_attention_split",
  )(lengths, block_tables, qg, k_pages.reshape(pool_rows, num_kv_heads, head_dim),
    v_pages.reshape(pool_rows, num_kv_heads, head_dim))
  out = decode_triton.combine(o, m, l)  # [batch, num_kv_heads, group, head_dim]
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def resolve_config(q, k_pages, block_tables,
                   config: PagedAttentionConfig | None) -> PagedAttentionConfig:
  return config_lib.resolve(PagedAttentionConfig, config, cfg.OP_DIR,
                            cfg.call_key(q, k_pages, block_tables),
                            functools.partial(cfg.call_heuristic, q=q, k_pages=k_pages,
                                              block_tables=block_tables))


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    config: PagedAttentionConfig | None = None, interpret: bool = False):
  """The Triton implementation; arguments are checked by `api.paged_attention`."""
  config = resolve_config(q, k_pages, block_tables, config)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  sliding_window = None if sliding_window is None else int(sliding_window)
  return _forward(q, k_pages, v_pages, block_tables, lengths, scale=scale,
                  sliding_window=sliding_window,
                  logit_softcap=None if logit_softcap is None else float(logit_softcap),
                  config=config, interpret=interpret)
