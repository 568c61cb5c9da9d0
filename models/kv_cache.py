"""The KV cache: per-layer key/value buffers and the filled length of each row, as one pytree.

A plain dataclass registered as a pytree, so the engine can pass it through `jax.jit` and donate
it (`donate_argnums`): every update is a functional `.at[].set` / `dynamic_update_slice` that XLA
performs in place on a donated buffer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """`k[layer]`, `v[layer]`: [max_batch, max_seq_len, num_kv_heads, head_dim]; `lengths`: int32
  [max_batch], the number of filled positions of each row (the next token goes at `lengths[b]`)."""

  k: tuple
  v: tuple
  lengths: jax.Array

  @classmethod
  def create(cls, num_layers: int, max_batch: int, max_seq_len: int, num_kv_heads: int,
             head_dim: int, dtype=jnp.float32) -> KVCache:
    shape = (max_batch, max_seq_len, num_kv_heads, head_dim)
    # Separate buffers per layer (not one stacked array): each layer's update then touches only
    # its own buffer, and donation keeps every one of them in place.
    k = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(k=k, v=v, lengths=jnp.zeros((max_batch,), jnp.int32))

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def max_batch(self) -> int:
    return self.k[0].shape[0]

  @property
  def max_seq_len(self) -> int:
    return self.k[0].shape[1]

  def replace(self, **changes) -> KVCache:
    return dataclasses.replace(self, **changes)
