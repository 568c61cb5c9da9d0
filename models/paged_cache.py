"""The paged KV cache: per-layer pools of fixed-size pages, as one pytree.

A sequence's K/V live in the pages its block table names (entry p holds positions
p * page_size .. (p + 1) * page_size - 1), so memory is taken a page at a time as a sequence grows
instead of `max_seq_len` up front, and full pages can be shared between sequences with the same
prefix. Which pages a sequence owns is host-side bookkeeping (`engine.paging.BlockManager`); this
pytree is only the device memory, passed through `jax.jit` and donated so every write is in place.
Page 0 is the scratch page: padding rows and unused table entries point at it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
  """`k[layer]`, `v[layer]`: [num_pages, page_size, num_kv_heads, head_dim]."""

  k: tuple
  v: tuple

  @classmethod
  def create(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
             head_dim: int, dtype=jnp.float32) -> PagedKVCache:
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    # One buffer per layer, as in KVCache: each layer's scatter then touches only its own pool.
    k = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(k=k, v=v)

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[1]

  def replace(self, **changes) -> PagedKVCache:
    return dataclasses.replace(self, **changes)


def slots(block_tables: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int,
          num_pages: int) -> jax.Array:
  """Flat slot (page * page_size + offset) of each position; invalid ones get an index past the
  pool, which a scatter with mode="drop" skips. block_tables [B, P]; positions, valid [B, ...]."""
  page_index = jnp.clip(positions // page_size, 0, block_tables.shape[1] - 1)
  rows = jnp.arange(block_tables.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
  page = block_tables[rows, page_index]
  return jnp.where(valid, page * page_size + positions % page_size, num_pages * page_size)


def write(pages: jax.Array, new: jax.Array, slot: jax.Array, *, in_bounds: bool = False
          ) -> jax.Array:
  """Scatter new [..., kv_heads, head_dim] rows into pages [num_pages, page_size, kv_heads,
  head_dim] at flat `slot` [...] (page * page_size + offset): in place under donation.
  `in_bounds`: every slot is a real one (decode: padding rows write the scratch page), so the
  scatter needs no bounds check; otherwise slots past the pool are dropped.

  The scatter indexes the pool as stored, by (page, offset), so the update's operand and result
  have one shape. Scattering into a flat [num_pages * page_size, ...] view and reshaping back
  put a bitcast between them; where a one-row scatter becomes a dynamic-update-slice fusion
  (decode at batch 1), copy insertion then kept a copy of the pool before each write in the
  decode loop: 60 per SmolLM2 step. Each was given the pool's own buffer (a memcpy onto itself,
  which glibc skips, so XLA:CPU step times did not show them); tests/engine/test_pool_copies.py
  keeps the count at 0."""
  page_size = pages.shape[1]
  slot = slot.reshape(-1)
  rows = new.reshape(-1, *new.shape[-2:]).astype(pages.dtype)
  # A dropped slot (num_pages * page_size) lands on page num_pages: out of bounds, as it must be.
  pages = pages.at[slot // page_size, slot % page_size].set(
      rows, mode="promise_in_bounds" if in_bounds else "drop")
  # The barrier makes the scatter one in-place update that readers then share. Without it,
  # XLA:CPU fused a private copy of the scatter into each reader (the attention's gather and
  # the next write), and each copy started by duplicating the whole pool (240 pool copies per
  # SmolLM2 decode step, 7x the step time at the default pool).
  return jax.lax.optimization_barrier(pages)


def gather(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
  """The dense [B, P * page_size, kv_heads, head_dim] view of each row's pages (a copy): what
  a chunk of prefill queries attends to."""
  dense = pages[block_tables]  # [B, P, page_size, kv_heads, head_dim]
  b, p, s = dense.shape[:3]
  return dense.reshape(b, p * s, *dense.shape[3:])
