"""Tuning knobs of the paged flash-decoding kernel: the same four as decode attention.

The kernel streams a sequence's keys in blocks of `block_k` logical positions; each block's rows
are gathered from the pages the block table names (several pages per block when pages are
small, part of one page when they are large), so `block_k` does not depend on `page_size`.
Memory traffic, and so every reason behind decode attention's heuristic, is the same: the
bytes per block, the programs needed to fill the GPU, the stages in flight. That heuristic is
reused as is, with the table's capacity (max_pages * page_size) as the cache length.
See bench/notes/paged_attention.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from pallas_kernels._core import device
from pallas_kernels.ops.decode_attention import config as decode_cfg
from pallas_kernels.ops.decode_attention.config import DecodeAttentionConfig

OP_DIR = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig(DecodeAttentionConfig):
  """block_k (keys per loop step, a power of two >= 16, any page size), num_splits (programs
  along the key axis per (sequence, KV head)), num_warps, num_stages."""

  def __post_init__(self):
    try:
      super().__post_init__()
    except ValueError as error:  # the checks are decode attention's; the name is ours
      message = str(error).replace(DecodeAttentionConfig.__name__, type(self).__name__)
      raise ValueError(message) from None


def capacity(block_tables, page_size: int) -> int:
  """Positions a block table can address: lengths beyond it are clamped to it."""
  return block_tables.shape[1] * page_size


def tuning_key(*, head_dim: int, dtype, group: int, num_kv_heads: int, page_size: int,
               max_len: int, batch: int) -> dict:
  """Decode attention's key (max_len = the table's capacity) plus the exact page size."""
  key = decode_cfg.tuning_key(head_dim=head_dim, dtype=dtype, group=group,
                              num_kv_heads=num_kv_heads, max_len=max_len, batch=batch)
  return {**key, "page_size": int(page_size)}


def heuristic(target: device.Target, *, batch: int, num_kv_heads: int, max_len: int,
              head_dim: int, dtype) -> PagedAttentionConfig:
  base = decode_cfg.heuristic(target, batch=batch, num_kv_heads=num_kv_heads, max_len=max_len,
                              head_dim=head_dim, dtype=dtype)
  return PagedAttentionConfig(**dataclasses.asdict(base))


def call_sizes(q, k_pages, block_tables) -> dict:
  """The heuristic's arguments for one call (arrays may be ShapeDtypeStructs)."""
  batch, _, head_dim = q.shape
  return dict(batch=batch, num_kv_heads=k_pages.shape[2], head_dim=head_dim, dtype=q.dtype,
              max_len=capacity(block_tables, k_pages.shape[1]))


def call_key(q, k_pages, block_tables) -> dict:
  sizes = call_sizes(q, k_pages, block_tables)
  return tuning_key(head_dim=sizes["head_dim"], dtype=sizes["dtype"],
                    group=q.shape[1] // sizes["num_kv_heads"],
                    num_kv_heads=sizes["num_kv_heads"], page_size=k_pages.shape[1],
                    max_len=sizes["max_len"], batch=sizes["batch"])


def call_heuristic(target: device.Target, q, k_pages, block_tables) -> PagedAttentionConfig:
  return heuristic(target, **call_sizes(q, k_pages, block_tables))


# ---- autotune hooks (see pallas_kernels/autotune/__init__.py) ---------------------------------

def autotune_key(op: str, q, k_pages, v_pages, block_tables, *args, **kwargs) -> dict:
  del op, v_pages, args, kwargs
  return call_key(q, k_pages, block_tables)


def autotune_default(target: device.Target, q, k_pages, v_pages, block_tables, *args,
                     **kwargs) -> PagedAttentionConfig:
  del v_pages, args, kwargs
  return call_heuristic(target, q, k_pages, block_tables)


def dense_cache_shape(q, k_pages, block_tables) -> jax.ShapeDtypeStruct:
  """The dense `[batch, capacity, kv_heads, head_dim]` cache a table describes, as a shape."""
  _, page_size, num_kv_heads, head_dim = k_pages.shape
  return jax.ShapeDtypeStruct(
      (q.shape[0], capacity(block_tables, page_size), num_kv_heads, head_dim), k_pages.dtype)


def candidates(target: device.Target, q, k_pages, v_pages, block_tables, *args,
               **kwargs) -> list[PagedAttentionConfig]:
  """Decode attention's candidates for the dense cache of the same capacity, nearest first."""
  del v_pages, args, kwargs
  found = decode_cfg.candidates(target, q, dense_cache_shape(q, k_pages, block_tables))
  return [PagedAttentionConfig(**dataclasses.asdict(c)) for c in found]
