"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) as a Flax NNX module.

Every projection (the LM head included), the gated MLP, every norm and every attention goes through
`pallas_kernels`, with one `impl=` (and `interpret=`) for the whole model, so the same module runs
on CPU ("xla"), in interpret mode (tests) and on a GPU ("triton"). A tied LM head contracts against
the embedding as stored, with no transpose of it: see `_logits`.

Entry points (`models.decoder.Decoder`, shared with GPT-2), all pure functions of (module state,
inputs, cache) so the engine can `jax.jit` them over `(graphdef, state, cache, ...)` with
`nnx.split`/`nnx.merge` and donate the cache:
  logits = model(tokens)                                  full causal forward, no cache
  logits, cache = model.prefill(tokens, lengths, cache)   right-padded prompts, logits at lengths-1
  logits, cache = model.decode(tokens, cache)             one token per row at cache.lengths
`prefill_step` / `decode_step` below are the same calls as free functions of (graphdef, state, ...).

Weight layout (what `models.gguf` and the Hugging Face loaders fill in): projections are [in, out]
(`x @ w`); Q, K and V are fused into `wqkv` = [q | k | v] along `out`, un-permuted (HF rotate_half
layout); the embedding is [vocab, hidden].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import rope
from models.decoder import Decoder, tied_logits
from models.rope import RopeScaling
from pallas_kernels.ops.matmul import gated_matmul, matmul
from pallas_kernels.ops.normalization import rms_norm


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and hyper-parameters of a Llama-family model; presets below."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  sliding_window: int | None = None  # Mistral v0.1: keys within the last `sliding_window` positions

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LlamaConfig: `{name}` expected a positive int, got {value!r}")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"LlamaConfig: `hidden_size` ({self.hidden_size}) is not a multiple of "
                         f"`num_heads` ({self.num_heads}); give `head_dim` explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: `head_dim` expected an even number (RoPE pairs), "
                       f"got {self.head_dim}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: `num_heads` ({self.num_heads}) expected a multiple of "
                       f"`num_kv_heads`, got {self.num_kv_heads}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"LlamaConfig: `sliding_window` expected a positive int or None, "
                       f"got {self.sliding_window!r}")

  @property
  def qkv_size(self) -> int:
    return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  # Presets: values from each model's published config.json.
  @classmethod
  def smollm2_135m(cls) -> LlamaConfig:
    return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True)

  @classmethod
  def llama2_7b(cls) -> LlamaConfig:
    return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096)

  @classmethod
  def llama3_8b(cls) -> LlamaConfig:
    return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
               num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=8192)

  @classmethod
  def llama3_1_8b(cls) -> LlamaConfig:
    return cls.llama3_8b().replace(
        max_position_embeddings=131072,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))

  @classmethod
  def mistral_7b(cls) -> LlamaConfig:
    """Mistral-7B v0.1 (4096-token sliding window)."""
    return cls(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
               num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=32768, sliding_window=4096)

  @classmethod
  def qwen2_0_5b(cls) -> LlamaConfig:
    return cls(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
               num_heads=14, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=32768, tie_word_embeddings=True, qkv_bias=True)

  @classmethod
  def qwen2_7b(cls) -> LlamaConfig:
    return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
               num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=32768, qkv_bias=True)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> LlamaConfig:
    """From a Hugging Face `config.json` of a LlamaForCausalLM / MistralForCausalLM /
    Qwen2ForCausalLM checkpoint."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
      raise ValueError(f"LlamaConfig.from_hf_dict: `model_type` expected 'llama', 'mistral' or "
                       f"'qwen2', got {model_type!r}")
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
      window = None
    num_heads = hf["num_attention_heads"]
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", 10000.0),
        rope_scaling=rope_scaling_from_hf(hf.get("rope_scaling")),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(model_type == "qwen2") or bool(hf.get("attention_bias", False)),
        sliding_window=window)


def rope_scaling_from_hf(scaling: dict | None) -> RopeScaling | None:
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind in (None, "default"):
    return None
  if kind == "linear":
    return RopeScaling("linear", factor=float(scaling["factor"]))
  if kind == "llama3":
    return RopeScaling("llama3", factor=float(scaling["factor"]),
                       low_freq_factor=float(scaling["low_freq_factor"]),
                       high_freq_factor=float(scaling["high_freq_factor"]),
                       original_max_position_embeddings=int(
                           scaling["original_max_position_embeddings"]))
  raise ValueError(f"rope_scaling: `rope_type` expected 'llama3', 'linear' or 'default', "
                   f"got {kind!r}")


@functools.lru_cache(maxsize=None)
def _inverse_frequencies(config: LlamaConfig):
  return rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> nnx.Param:
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _ones(size: int, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones((size,), dtype))


class Attention(nnx.Module):
  """Fused QKV projection with RoPE; the attention itself is passed in (cached or not)."""

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.wqkv = _normal(rngs, (config.hidden_size, config.qkv_size), dtype)
    self.bqkv = nnx.Param(jnp.zeros((config.qkv_size,), dtype)) if config.qkv_bias else None
    self.wo = _normal(rngs, (config.num_heads * config.head_dim, config.hidden_size), dtype)

  def qkv(self, x, cos, sin, config: LlamaConfig, kernel_args: dict):
    """x [..., hidden] -> q [..., heads, head_dim], k and v [..., kv_heads, head_dim]."""
    bias = None if self.bqkv is None else self.bqkv[...]
    qkv = matmul(x, self.wqkv[...], bias=bias, **kernel_args)
    qkv = qkv.reshape(*x.shape[:-1], config.num_heads + 2 * config.num_kv_heads, config.head_dim)
    rotated = config.num_heads + config.num_kv_heads  # q and k heads, rotated in one pass
    qk = rope.apply(qkv[..., :rotated, :], cos, sin)
    return qk[..., :config.num_heads, :], qk[..., config.num_heads:, :], qkv[..., rotated:, :]

  def out(self, o, kernel_args: dict):
    """o [..., heads, head_dim] -> [..., hidden]."""
    return matmul(o.reshape(*o.shape[:-2], -1), self.wo[...], **kernel_args)


class MLP(nnx.Module):
  """SwiGLU: w_down(silu(x @ w_gate) * (x @ w_up))."""

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.w_gate = _normal(rngs, (config.hidden_size, config.intermediate_size), dtype)
    self.w_up = _normal(rngs, (config.hidden_size, config.intermediate_size), dtype)
    self.w_down = _normal(rngs, (config.intermediate_size, config.hidden_size), dtype)

  def __call__(self, x, kernel_args: dict):
    gated = gated_matmul(x, self.w_gate[...], self.w_up[...], activation="silu", **kernel_args)
    return matmul(gated, self.w_down[...], **kernel_args)


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.attn_norm = _ones(config.hidden_size, dtype)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = _ones(config.hidden_size, dtype)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)


class Llama(Decoder):
  """A Llama-family decoder. `dtype` is the parameter (and activation) dtype, float32 or bfloat16;
  norm and softmax statistics are float32 inside the kernels; logits are float32."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, impl: str | None = None,
               interpret: bool = False, rngs: nnx.Rngs):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise TypeError(f"Llama: `dtype` expected float32 or bfloat16, got {dtype}")
    self.config = config
    self.dtype = dtype
    self.impl = impl
    self.interpret = interpret
    self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), dtype)
    self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = _ones(config.hidden_size, dtype)
    self.lm_head = (None if config.tie_word_embeddings
                    else _normal(rngs, (config.hidden_size, config.vocab_size), dtype))

  # -- pieces -------------------------------------------------------------------------------

  def _embed(self, tokens, positions):
    del positions  # RoPE, applied to q and k in the layers
    return jnp.take(self.embed[...], tokens, axis=0)

  def _norm(self, weight: nnx.Param, delta, h):
    """Pre-norm with the residual add fused: returns (norm(h + delta), h + delta)."""
    eps = self.config.rms_norm_eps
    if delta is None:
      return rms_norm(h, weight[...], eps=eps, **self._kernel_args), h
    return rms_norm(delta, weight[...], eps=eps, residual=h, **self._kernel_args)

  def _layers(self, h, positions, attend):
    """h [..., hidden] embeddings at `positions` [...] -> (last block's output, residual stream):
    the final add is left to the caller's fused norm (after it picks the rows it needs)."""
    cos, sin = rope.cos_sin(positions, _inverse_frequencies(self.config))
    delta = None
    for index, layer in enumerate(self.layers):
      x, h = self._norm(layer.attn_norm, delta, h)
      q, k, v = layer.attn.qkv(x, cos, sin, self.config, self._kernel_args)
      delta = layer.attn.out(attend(index, q, k, v), self._kernel_args)
      x, h = self._norm(layer.mlp_norm, delta, h)
      delta = layer.mlp(x, self._kernel_args)
    return delta, h

  def _logits(self, x):
    """x [..., hidden] -> float32 [..., vocab]."""
    if self.lm_head is not None:
      return matmul(x, self.lm_head[...], out_dtype=jnp.float32, **self._kernel_args)
    return tied_logits(x, self.embed[...], self._kernel_args)  # no transpose of the embedding


def prefill_step(graphdef, state, tokens, lengths, cache, start=None):
  """`Llama.prefill` as a function of (graphdef, state): jit with graphdef static."""
  return nnx.merge(graphdef, state).prefill(tokens, lengths, cache, start)


def decode_step(graphdef, state, tokens, cache):
  """`Llama.decode` as a function of (graphdef, state): jit with graphdef static, donate cache."""
  return nnx.merge(graphdef, state).decode(tokens, cache)


def param_bytes(model: nnx.Module) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

