"""Paged decode attention in plain JAX: the "xla" implementation and the float64 test oracle.

The pages of each sequence are gathered through its block table into the dense
`[batch, max_pages * page_size, num_kv_heads, head_dim]` cache layout, then decode_attention's
reference does the rest: it masks by value, so whatever the pages past `lengths` hold (the
engine's scratch page, NaN, another sequence's keys) cannot reach the output.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.ops.decode_attention import reference as decode_reference


def clamp_page_ids(block_tables, num_pages: int):
  """Table entries clamped into [0, num_pages): an out-of-range entry past a row's length (e.g.
  a -1 padding slot) then reads a real page instead of faulting, and is masked like any other."""
  return jnp.clip(block_tables, 0, num_pages - 1)


def gather_pages(pages, block_tables):
  """`[num_pages, page_size, kv_heads, head_dim]` pages -> the dense cache
  `[batch, max_pages * page_size, kv_heads, head_dim]` that the block tables describe."""
  num_pages, page_size, num_kv_heads, head_dim = pages.shape
  batch, max_pages = block_tables.shape
  dense = pages[clamp_page_ids(block_tables, num_pages)]  # [batch, max_pages, page_size, ...]
  return dense.reshape(batch, max_pages * page_size, num_kv_heads, head_dim)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                    sliding_window: int | None = None, logit_softcap: float | None = None):
  """q `[batch, num_heads, head_dim]`, pages `[num_pages, page_size, num_kv_heads, head_dim]`,
  block_tables int32 `[batch, max_pages]`, lengths int32 `[batch]`."""
  return decode_reference.decode_attention(
      q, gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables), lengths,
      scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
