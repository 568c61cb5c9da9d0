"""What every decoder family shares: the cache contract and the entry points the engine calls.

A family (`models.llama.Llama`, `models.gpt2.GPT2`) subclasses `Decoder` and supplies its layers
through four methods; the cache handling, the argument checks and the positions are written once:
  _embed(tokens, positions) -> h [..., hidden]
  _layers(h, positions, attend) -> (delta, h): the last block's output and the residual stream,
      with the final add left to the fused final norm; `attend(layer, q, k, v)` is the attention,
      cached or not, chosen by the entry point
  _norm(self.final_norm, delta, h) -> (norm(h + delta), h + delta)
  _logits(x [..., hidden]) -> float32 [..., vocab]
and sets `config` (num_layers, num_kv_heads, head_dim, sliding_window), `dtype`, `impl`,
`interpret` and `final_norm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import paged_cache
from models.kv_cache import KVCache
from models.paged_cache import PagedKVCache
from pallas_kernels.ops.attention import attention
from pallas_kernels.ops.decode_attention import decode_attention
from pallas_kernels.ops.matmul import matmul
from pallas_kernels.ops.paged_attention import paged_attention


class Decoder(nnx.Module):
  """The entry points, all pure functions of (module state, inputs, cache) so the engine can
  `jax.jit` them over `(graphdef, state, cache, ...)` with `nnx.split`/`nnx.merge` and donate the
  cache."""

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens int32 [batch, seq] -> logits float32 [batch, seq, vocab]; causal, no cache."""
    _check_tokens(f"{self._name}.__call__", "tokens", tokens, ndim=2)
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def attend(layer, q, k, v):
      del layer
      return attention(q, k, v, causal=True, sliding_window=self.config.sliding_window,
                       **self._kernel_args)

    delta, h = self._layers(self._embed(tokens, positions), positions, attend)
    return self._logits(self._norm(self.final_norm, delta, h)[0])

  def init_cache(self, batch_size: int, max_seq_len: int, dtype=None) -> KVCache:
    c = self.config
    return KVCache.create(c.num_layers, batch_size, max_seq_len, c.num_kv_heads, c.head_dim,
                          self.dtype if dtype is None else dtype)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
              start: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Run right-padded prompts and fill the cache.

    tokens int32 [B, T], row b valid in tokens[b, :lengths[b]]; `start` int32 [B] (default 0) is
    the absolute position of tokens[:, 0], for chunked prefill over an already-filled cache.
    K/V are written at positions start..start+T-1 (padding included; it is never attended,
    since later tokens overwrite it), cache.lengths becomes start + lengths, and the logits
    float32 [B, vocab] are those of each row's last valid token (position start + lengths - 1).
    """
    op = f"{self._name}.prefill"
    _check_tokens(op, "tokens", tokens, ndim=2)
    batch, seq = tokens.shape
    _check_vector(op, "lengths", lengths, batch)
    _check_cache(op, cache, batch, self.config)
    if start is not None:
      _check_vector(op, "start", start, batch)
    if seq > cache.max_seq_len:
      raise ValueError(f"{op}: `tokens` has {seq} positions, more than the cache's "
                       f"max_seq_len {cache.max_seq_len}")
    offset = jnp.zeros((batch,), jnp.int32) if start is None else start
    positions = offset[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    new_k, new_v = list(cache.k), list(cache.v)

    def attend(layer, q, k, v):
      kv_dtype = cache.k[layer].dtype
      if start is None:
        # Fresh prompts: write at 0..T-1 and attend over this chunk's own K/V only (T keys,
        # not max_seq_len); right padding sits after every valid query, so causality hides it.
        new_k[layer] = jax.lax.dynamic_update_slice(cache.k[layer], k.astype(kv_dtype), (0, 0, 0, 0))
        new_v[layer] = jax.lax.dynamic_update_slice(cache.v[layer], v.astype(kv_dtype), (0, 0, 0, 0))
        return attention(q, k, v, causal=True, sliding_window=self.config.sliding_window,
                         **self._kernel_args)
      write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice(buf, new, (at, 0, 0)))
      new_k[layer] = write(cache.k[layer], k.astype(kv_dtype), start)
      new_v[layer] = write(cache.v[layer], v.astype(kv_dtype), start)
      return attention(q.astype(kv_dtype), new_k[layer], new_v[layer], causal=True, q_offset=start,
                       sliding_window=self.config.sliding_window,
                       **self._kernel_args).astype(q.dtype)

    delta, h = self._layers(self._embed(tokens, positions), positions, attend)
    last = (lengths - 1)[:, None, None]
    delta = jnp.take_along_axis(delta, last, axis=1)[:, 0]
    h = jnp.take_along_axis(h, last, axis=1)[:, 0]
    logits = self._logits(self._norm(self.final_norm, delta, h)[0])
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v), lengths=offset + lengths)

  def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One step: tokens int32 [B] at positions cache.lengths -> (logits float32 [B, vocab],
    cache with their K/V written in place and lengths + 1)."""
    op = f"{self._name}.decode"
    _check_tokens(op, "tokens", tokens, ndim=1)
    batch = tokens.shape[0]
    _check_cache(op, cache, batch, self.config)
    positions = cache.lengths
    rows = jnp.arange(batch)
    new_k, new_v = list(cache.k), list(cache.v)

    def attend(layer, q, k, v):
      kv_dtype = cache.k[layer].dtype
      # A scatter of one [kv_heads, head_dim] row per batch row: in place under donation.
      new_k[layer] = cache.k[layer].at[rows, positions].set(k.astype(kv_dtype), mode="drop")
      new_v[layer] = cache.v[layer].at[rows, positions].set(v.astype(kv_dtype), mode="drop")
      return decode_attention(q.astype(kv_dtype), new_k[layer], new_v[layer], positions + 1,
                              sliding_window=self.config.sliding_window,
                              **self._kernel_args).astype(q.dtype)

    delta, h = self._layers(self._embed(tokens, positions), positions, attend)
    logits = self._logits(self._norm(self.final_norm, delta, h)[0])
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v), lengths=positions + 1)

  # ---- paged cache (engine v2): positions and block tables come from the host's allocator

  def init_paged_cache(self, num_pages: int, page_size: int, dtype=None) -> PagedKVCache:
    c = self.config
    return PagedKVCache.create(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim,
                               self.dtype if dtype is None else dtype)

  def paged_prefill(self, tokens: jax.Array, lengths: jax.Array, start: jax.Array,
                    cache: PagedKVCache, block_tables: jax.Array) -> tuple[jax.Array, PagedKVCache]:
    """A chunk of each row's prompt against the pages already written (chunked prefill).

    tokens int32 [B, T], row b valid in tokens[b, :lengths[b]] at absolute positions
    start[b] ..; block_tables int32 [B, P] must cover start + lengths. Only valid tokens are
    written (padding goes nowhere, so it can never land in a page another sequence shares).
    Returns the logits float32 [B, vocab] of each row's last valid token, and the cache.
    """
    op = f"{self._name}.paged_prefill"
    _check_tokens(op, "tokens", tokens, ndim=2)
    batch, seq = tokens.shape
    for name, x in (("lengths", lengths), ("start", start)):
      _check_vector(op, name, x, batch)
    _check_paged(op, cache, block_tables, batch, self.config)
    positions = start[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    valid = jnp.arange(seq)[None, :] < lengths[:, None]
    slot = paged_cache.slots(block_tables, positions, valid, cache.page_size, cache.num_pages)
    new_k, new_v = list(cache.k), list(cache.v)

    def attend(layer, q, k, v):
      new_k[layer] = paged_cache.write(cache.k[layer], k, slot)
      new_v[layer] = paged_cache.write(cache.v[layer], v, slot)
      # Prefill is compute-bound: a dense gather of the row's pages costs little next to the
      # chunk's attention, and lets the (differentiable, tuned) prefill kernel do the work.
      keys = paged_cache.gather(new_k[layer], block_tables)
      values = paged_cache.gather(new_v[layer], block_tables)
      return attention(q.astype(keys.dtype), keys, values, causal=True, q_offset=start,
                       lengths=start + lengths, sliding_window=self.config.sliding_window,
                       **self._kernel_args).astype(q.dtype)

    delta, h = self._layers(self._embed(tokens, positions), positions, attend)
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    delta = jnp.take_along_axis(delta, last, axis=1)[:, 0]
    h = jnp.take_along_axis(h, last, axis=1)[:, 0]
    logits = self._logits(self._norm(self.final_norm, delta, h)[0])
    return logits, PagedKVCache(k=tuple(new_k), v=tuple(new_v))

  def paged_decode(self, tokens: jax.Array, positions: jax.Array, cache: PagedKVCache,
                   block_tables: jax.Array) -> tuple[jax.Array, PagedKVCache]:
    """One step: tokens int32 [B] at positions int32 [B] -> (logits float32 [B, vocab], cache
    with their K/V written into the pages block_tables [B, P] name). A padding row points its
    table at the scratch page."""
    op = f"{self._name}.paged_decode"
    _check_tokens(op, "tokens", tokens, ndim=1)
    batch = tokens.shape[0]
    _check_vector(op, "positions", positions, batch)
    _check_paged(op, cache, block_tables, batch, self.config)
    slot = paged_cache.slots(block_tables, positions, jnp.ones_like(positions, bool),
                             cache.page_size, cache.num_pages)
    # Positions past the table clip to its last entry, and entries are pages: always in bounds.
    slot = jnp.clip(slot, 0, cache.num_pages * cache.page_size - 1)
    new_k, new_v = list(cache.k), list(cache.v)

    def attend(layer, q, k, v):
      new_k[layer] = paged_cache.write(cache.k[layer], k, slot, in_bounds=True)
      new_v[layer] = paged_cache.write(cache.v[layer], v, slot, in_bounds=True)
      return paged_attention(q.astype(new_k[layer].dtype), new_k[layer], new_v[layer],
                             block_tables, positions + 1,
                             sliding_window=self.config.sliding_window,
                             **self._kernel_args).astype(q.dtype)

    delta, h = self._layers(self._embed(tokens, positions), positions, attend)
    logits = self._logits(self._norm(self.final_norm, delta, h)[0])
    return logits, PagedKVCache(k=tuple(new_k), v=tuple(new_v))

  @property
  def _kernel_args(self) -> dict:
    return {"impl": self.impl, "interpret": self.interpret}

  @property
  def _name(self) -> str:
    return type(self).__name__


def tied_logits(x, embed, kernel_args: dict):
  """x [..., hidden] against the [vocab, hidden] embedding as stored -> float32 [..., vocab].

  `matmul` takes w as [K, N], and embed.T as a weight would be either a second copy of the
  largest tensor or a transpose materialised every step (19 ms of a ~25 ms CPU decode step). So
  the embedding is the left operand: logits.T = embed @ x.T, with x.T [hidden, rows] tiny at
  decode; the [vocab, rows] result is transposed back."""
  rows = x.reshape(-1, x.shape[-1])
  logits_t = matmul(embed, rows.T, out_dtype=jnp.float32, **kernel_args)
  return logits_t.T.reshape(*x.shape[:-1], -1)


def check_dtype(op: str, dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise TypeError(f"{op}: `dtype` expected float32 or bfloat16, got {dtype}")
  return dtype


def _check_tokens(op: str, name: str, tokens, *, ndim: int):
  if not hasattr(tokens, "dtype") or jnp.dtype(tokens.dtype) != jnp.int32 or tokens.ndim != ndim:
    layout = "[batch, seq]" if ndim == 2 else "[batch]"
    got = (f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
           f"{tuple(getattr(tokens, 'shape', ()))}")
    raise TypeError(f"{op}: `{name}` expected int32 {layout}, got {got}")


def _check_vector(op: str, name: str, x, batch: int):
  if not hasattr(x, "dtype") or jnp.dtype(x.dtype) != jnp.int32 or tuple(x.shape) != (batch,):
    got = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
    raise TypeError(f"{op}: `{name}` expected int32 ({batch},), got {got}")


def _check_cache(op: str, cache: KVCache, batch: int, config):
  if not isinstance(cache, KVCache):
    raise TypeError(f"{op}: `cache` expected a KVCache, got {type(cache).__name__}")
  want = (batch, cache.max_seq_len, config.num_kv_heads, config.head_dim)
  if cache.num_layers != config.num_layers or tuple(cache.k[0].shape) != want:
    raise ValueError(f"{op}: `cache` expected {config.num_layers} layers of {want} "
                     f"[batch, max_seq_len, kv_heads, head_dim], got {cache.num_layers} layers "
                     f"of {tuple(cache.k[0].shape)}")


def _check_paged(op: str, cache: PagedKVCache, block_tables, batch: int, config):
  if not isinstance(cache, PagedKVCache):
    raise TypeError(f"{op}: `cache` expected a PagedKVCache, got {type(cache).__name__}")
  want = (config.num_kv_heads, config.head_dim)
  if cache.num_layers != config.num_layers or tuple(cache.k[0].shape[2:]) != want:
    raise ValueError(f"{op}: `cache` expected {config.num_layers} layers of [num_pages, "
                     f"page_size, {want[0]}, {want[1]}], got {cache.num_layers} layers of "
                     f"{tuple(cache.k[0].shape)}")
  if (not hasattr(block_tables, "dtype") or jnp.dtype(block_tables.dtype) != jnp.int32
      or block_tables.ndim != 2 or block_tables.shape[0] != batch):
    got = (f"{getattr(block_tables, 'dtype', type(block_tables).__name__)} "
           f"{tuple(getattr(block_tables, 'shape', ()))}")
    raise TypeError(f"{op}: `block_tables` expected int32 [{batch}, max_pages], got {got}")
