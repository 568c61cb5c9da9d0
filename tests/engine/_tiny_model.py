"""A tiny random Llama-shaped NNX model and a byte tokenizer that honour the `models` contract.

The engine tests run against this stand-in: it compiles in about a second, its tokenizer splits
multi-byte UTF-8 characters across tokens (one token per byte), and it has both cached paths
(`prefill` / `decode` over a contiguous cache and `paged_prefill` / `paged_decode` over a page
pool, the contracts the engine uses) and an uncached `__call__(tokens)` that the
tests use as the oracle.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import paged_cache
from models.paged_cache import PagedKVCache

BOS, EOS = 256, 257
CHAT_START, CHAT_END = 258, 259


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Same layout as `models.kv_cache.KVCache`: per-layer [batch, seq, kv_heads, head_dim]."""
  k: tuple
  v: tuple
  lengths: jax.Array

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  vocab_size: int = 320
  hidden_size: int = 32
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 8
  intermediate_size: int = 64
  max_position_embeddings: int = 1024
  rope_theta: float = 10000.0
  logit_scale: float = 0.5  # logits std ~3: peaked like a real model, not one-hot
  text_bias: float = 3.0  # added to the logits of ' ', a-z and the lead byte of 'é', so the
                          # random model writes text-like bytes (with some 2-byte characters)


def _rope(x, positions, theta):
  """x [..., T, H, D], positions [..., T]."""
  half = x.shape[-1] // 2
  inv = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  ang = positions.astype(jnp.float32)[..., None, None] * inv
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rms(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


class Layer(nnx.Module):

  def __init__(self, c: TinyConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.2)
    self.wq = nnx.Param(init(rngs.params(), (c.hidden_size, c.num_heads * c.head_dim)))
    self.wk = nnx.Param(init(rngs.params(), (c.hidden_size, c.num_kv_heads * c.head_dim)))
    self.wv = nnx.Param(init(rngs.params(), (c.hidden_size, c.num_kv_heads * c.head_dim)))
    self.wo = nnx.Param(init(rngs.params(), (c.num_heads * c.head_dim, c.hidden_size)))
    self.w_up = nnx.Param(init(rngs.params(), (c.hidden_size, c.intermediate_size)))
    self.w_gate = nnx.Param(init(rngs.params(), (c.hidden_size, c.intermediate_size)))
    self.w_down = nnx.Param(init(rngs.params(), (c.intermediate_size, c.hidden_size)))
    self.norm1 = nnx.Param(jnp.ones((c.hidden_size,)))
    self.norm2 = nnx.Param(jnp.ones((c.hidden_size,)))
    self.c = c

  def qkv(self, x, positions):
    c = self.c
    h = _rms(x, self.norm1[...])
    q = (h @ self.wq[...]).reshape(*x.shape[:-1], c.num_heads, c.head_dim)
    k = (h @ self.wk[...]).reshape(*x.shape[:-1], c.num_kv_heads, c.head_dim)
    v = (h @ self.wv[...]).reshape(*x.shape[:-1], c.num_kv_heads, c.head_dim)
    return _rope(q, positions, c.rope_theta), _rope(k, positions, c.rope_theta), v

  def finish(self, x, attn):
    x = x + attn.reshape(*x.shape[:-1], -1) @ self.wo[...]
    h = _rms(x, self.norm2[...])
    return x + (jax.nn.silu(h @ self.w_gate[...]) * (h @ self.w_up[...])) @ self.w_down[...]


def _attend(q, k, v, mask):
  """q [B, T, H, D], k/v [B, S, KV, D], mask [B, T, S] -> [B, T, H, D]."""
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  s = jnp.where(mask[:, None], s, -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


class TinyLlama(nnx.Module):

  def __init__(self, config: TinyConfig = TinyConfig(), *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(),
                                                        (config.vocab_size, config.hidden_size)))
    self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = nnx.Param(jnp.ones((config.hidden_size,)))
    # Untied head: with a tied one a random model just repeats its input token.
    self.head = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(),
                                                       (config.vocab_size, config.hidden_size)))

  def _logits(self, x):
    h = _rms(x, self.norm[...])
    logits = jnp.einsum("...d,vd->...v", h, self.head[...]).astype(jnp.float32)
    return logits * self.config.logit_scale + self._bias()

  def _bias(self):
    text = [32, 0xC3, 0xA9] + list(range(97, 123))
    return jnp.zeros((self.config.vocab_size,)).at[jnp.array(text)].set(self.config.text_bias)

  def init_cache(self, batch_size, max_seq_len, dtype=None):
    c = self.config
    shape = (batch_size, max_seq_len, c.num_kv_heads, c.head_dim)
    dtype = dtype or self.embed[...].dtype
    return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                   lengths=jnp.zeros((batch_size,), jnp.int32))

  def init_paged_cache(self, num_pages, page_size, dtype=None):
    c = self.config
    return PagedKVCache.create(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim,
                               dtype or self.embed[...].dtype)

  def paged_prefill(self, tokens, lengths, start, cache, block_tables):
    """A chunk of prompt at positions start.. over the pages of block_tables (the contract of
    models.decoder.Decoder.paged_prefill): only valid tokens are written."""
    t = tokens.shape[1]
    pos = start[:, None] + jnp.arange(t)[None]
    valid = jnp.arange(t)[None] < lengths[:, None]
    keys = jnp.arange(block_tables.shape[1] * cache.page_size)[None, None]
    mask = (keys <= pos[:, :, None]) & (keys < (start + lengths)[:, None, None])
    return self._paged_forward(self.embed[...][tokens], pos, valid, mask, cache, block_tables,
                               jnp.maximum(lengths - 1, 0))

  def paged_decode(self, tokens, positions, cache, block_tables):
    pos = positions[:, None]
    keys = jnp.arange(block_tables.shape[1] * cache.page_size)
    mask = keys[None, None] <= pos[:, :, None]
    return self._paged_forward(self.embed[...][tokens][:, None], pos, jnp.ones_like(pos, bool),
                               mask, cache, block_tables, jnp.zeros_like(positions))

  def _paged_forward(self, x, pos, valid, mask, cache, block_tables, last):
    """x [B, T, D] at positions pos [B, T]; K/V of the valid tokens written into their pages,
    attention over the gathered pages under mask [B, T, keys] -> logits of token `last` [B]."""
    slot = paged_cache.slots(block_tables, pos, valid, cache.page_size, cache.num_pages)
    dense = lambda pages: paged_cache.gather(pages, block_tables).astype(x.dtype)
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      q, k, v = layer.qkv(x, pos)
      ks.append(paged_cache.write(cache.k[i], k, slot))
      vs.append(paged_cache.write(cache.v[i], v, slot))
      x = layer.finish(x, _attend(q, dense(ks[-1]), dense(vs[-1]), mask))
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return self._logits(x), PagedKVCache(tuple(ks), tuple(vs))

  def __call__(self, tokens):
    """Uncached forward: tokens [B, T] -> logits [B, T, vocab]."""
    x = self.embed[...][tokens]
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None].repeat(tokens.shape[0], 0)
    for layer in self.layers:
      q, k, v = layer.qkv(x, pos)
      x = layer.finish(x, _attend(q, k, v, mask))
    return self._logits(x)

  def prefill(self, tokens, lengths, cache):
    b, t = tokens.shape
    x = self.embed[...][tokens]
    pos = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (jnp.arange(t) < lengths[:, None])[:, None]
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      q, k, v = layer.qkv(x, pos)
      ks.append(jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, 0, 0, 0)))
      vs.append(jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, 0, 0, 0)))
      x = layer.finish(x, _attend(q, k, v, mask))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return self._logits(last), KVCache(tuple(ks), tuple(vs), lengths.astype(jnp.int32))

  def decode(self, tokens, cache):
    pos = cache.lengths
    x = self.embed[...][tokens][:, None]  # [B, 1, D]
    rows = jnp.arange(tokens.shape[0])
    s = cache.k[0].shape[1]
    mask = (jnp.arange(s)[None] <= pos[:, None])[:, None]  # [B, 1, S]
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      q, k, v = layer.qkv(x, pos[:, None])
      kc = cache.k[i].at[rows, pos].set(k[:, 0].astype(cache.k[i].dtype), mode="drop")
      vc = cache.v[i].at[rows, pos].set(v[:, 0].astype(cache.v[i].dtype), mode="drop")
      ks.append(kc)
      vs.append(vc)
      x = layer.finish(x, _attend(q, kc.astype(q.dtype), vc.astype(q.dtype), mask))
    return self._logits(x[:, 0]), KVCache(tuple(ks), tuple(vs), pos + 1)


class ByteTokenizer:
  """One token per UTF-8 byte (so multi-byte characters span tokens) plus a few specials."""

  bos_token_id = BOS
  eos_token_id = EOS

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
    ids = [BOS]
    for m in messages:
      ids += [CHAT_START] + self.encode(f"{m['role']}\n{m['content']}") + [CHAT_END]
    if add_generation_prompt:
      ids += [CHAT_START] + self.encode("assistant\n")
    return ids if tokenize else self.decode(ids)


def load(config: TinyConfig = TinyConfig(), seed: int = 0):
  """(model, tokenizer), like `models.load`."""
  return TinyLlama(config, rngs=nnx.Rngs(seed)), ByteTokenizer()
