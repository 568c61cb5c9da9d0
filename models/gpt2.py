"""GPT-2 as a Flax NNX module, on the same entry points and KV cache as the Llama family.

Pre-norm LayerNorm blocks (every norm fused with the residual add before it), learned absolute
positions, one fused QKV projection with bias, a GELU-tanh MLP (`matmul(..., activation=
"gelu_tanh")`, the bias and activation in the matmul epilogue) and a head tied to the token
embedding. Every projection (the tied head included: `models.decoder.tied_logits`), norm and
attention goes through `pallas_kernels`, with one `impl=` (and `interpret=`) for the whole model.

Entry points (from `models.decoder.Decoder`, the engine calls them generically):
  logits = model(tokens);  logits, cache = model.prefill(tokens, lengths, cache[, start])
  logits, cache = model.decode(tokens, cache);  cache = model.init_cache(batch, max_seq_len)
`models.prefill_step` / `models.decode_step` run them as free functions of (graphdef, state, ...).

Weight layout: projections [in, out] (`x @ w`), which is the layout of Hugging Face's GPT-2 Conv1D
weights as stored; `wqkv` = [q | k | v] along `out`; embeddings [vocab or positions, hidden].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.decoder import Decoder, check_dtype, tied_logits
from models.kv_cache import KVCache
from pallas_kernels.ops.matmul import matmul
from pallas_kernels.ops.normalization import layer_norm

# Hugging Face `activation_function` -> our matmul epilogue (gelu_new is the tanh approximation).
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Shapes and hyper-parameters of a GPT-2 model; presets below."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int | None = None  # None: 4 * hidden_size
  max_position_embeddings: int = 1024  # the learned position table: a hard limit
  layer_norm_eps: float = 1e-5
  activation: str = "gelu_tanh"
  tie_word_embeddings: bool = True

  def __post_init__(self):
    if self.intermediate_size is None:
      object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GPT2Config: `{name}` expected a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"GPT2Config: `hidden_size` ({self.hidden_size}) expected a multiple of "
                       f"`num_heads`, got {self.num_heads}")
    if self.activation not in ("gelu_tanh", "gelu", "relu"):
      raise ValueError(f"GPT2Config: `activation` expected 'gelu_tanh', 'gelu' or 'relu', "
                       f"got {self.activation!r}")

  # The cache contract of `Decoder`: multi-head attention, no window.
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def sliding_window(self) -> None:
    return None

  def replace(self, **changes) -> GPT2Config:
    return dataclasses.replace(self, **changes)

  # Presets: values from each model's published config.json.
  @classmethod
  def gpt2(cls) -> GPT2Config:
    """GPT-2 small (124M)."""
    return cls(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12)

  @classmethod
  def gpt2_medium(cls) -> GPT2Config:
    """GPT-2 medium (355M)."""
    return cls(vocab_size=50257, hidden_size=1024, num_layers=24, num_heads=16)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> GPT2Config:
    """From a Hugging Face `config.json` of a GPT2LMHeadModel checkpoint."""
    op = "GPT2Config.from_hf_dict"
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
      raise ValueError(f"{op}: `activation_function` expected one of "
                       f"{', '.join(HF_ACTIVATIONS)}, got {act!r}")
    # Variants whose numerics this module does not implement.
    for field, supported in (("scale_attn_weights", True),
                             ("scale_attn_by_inverse_layer_idx", False),
                             ("add_cross_attention", False)):
      if bool(hf.get(field, supported)) != supported:
        raise ValueError(f"{op}: `{field}` = {hf[field]!r} is not supported "
                         f"(expected {supported})")
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
               num_heads=hf["n_head"], intermediate_size=hf.get("n_inner"),
               max_position_embeddings=hf.get("n_positions", 1024),
               layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
               activation=HF_ACTIVATIONS[act],
               tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> nnx.Param:
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _zeros(size: int, dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros((size,), dtype))


class LayerNorm(nnx.Module):
  def __init__(self, size: int, dtype):
    self.weight = nnx.Param(jnp.ones((size,), dtype))
    self.bias = _zeros(size, dtype)


class Attention(nnx.Module):
  """Fused QKV projection with bias; the attention itself is passed in (cached or not)."""

  def __init__(self, config: GPT2Config, *, dtype, rngs: nnx.Rngs):
    hidden = config.hidden_size
    self.wqkv = _normal(rngs, (hidden, 3 * hidden), dtype)
    self.bqkv = _zeros(3 * hidden, dtype)
    self.wo = _normal(rngs, (hidden, hidden), dtype)
    self.bo = _zeros(hidden, dtype)

  def qkv(self, x, config: GPT2Config, kernel_args: dict):
    """x [..., hidden] -> q, k, v, each [..., heads, head_dim]."""
    qkv = matmul(x, self.wqkv[...], bias=self.bqkv[...], **kernel_args)
    qkv = qkv.reshape(*x.shape[:-1], 3, config.num_heads, config.head_dim)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

  def out(self, o, kernel_args: dict):
    """o [..., heads, head_dim] -> [..., hidden]."""
    return matmul(o.reshape(*o.shape[:-2], -1), self.wo[...], bias=self.bo[...], **kernel_args)


class MLP(nnx.Module):
  """w_out(act(x @ w_in + b_in)) + b_out, the bias and activation fused into the first matmul."""

  def __init__(self, config: GPT2Config, *, dtype, rngs: nnx.Rngs):
    self.w_in = _normal(rngs, (config.hidden_size, config.intermediate_size), dtype)
    self.b_in = _zeros(config.intermediate_size, dtype)
    self.w_out = _normal(rngs, (config.intermediate_size, config.hidden_size), dtype)
    self.b_out = _zeros(config.hidden_size, dtype)

  def __call__(self, x, activation: str, kernel_args: dict):
    hidden = matmul(x, self.w_in[...], bias=self.b_in[...], activation=activation, **kernel_args)
    return matmul(hidden, self.w_out[...], bias=self.b_out[...], **kernel_args)


class Block(nnx.Module):
  def __init__(self, config: GPT2Config, *, dtype, rngs: nnx.Rngs):
    self.attn_norm = LayerNorm(config.hidden_size, dtype)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = LayerNorm(config.hidden_size, dtype)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)


class GPT2(Decoder):
  """GPT-2. `dtype` is the parameter (and activation) dtype, float32 or bfloat16; norm and softmax
  statistics are float32 inside the kernels; logits are float32."""

  def __init__(self, config: GPT2Config, *, dtype=jnp.float32, impl: str | None = None,
               interpret: bool = False, rngs: nnx.Rngs):
    dtype = check_dtype("GPT2", dtype)
    self.config = config
    self.dtype = dtype
    self.impl = impl
    self.interpret = interpret
    self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), dtype)
    self.pos_embed = _normal(rngs, (config.max_position_embeddings, config.hidden_size), dtype,
                             std=0.01)
    self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = LayerNorm(config.hidden_size, dtype)
    self.lm_head = (None if config.tie_word_embeddings
                    else _normal(rngs, (config.hidden_size, config.vocab_size), dtype))

  def init_cache(self, batch_size: int, max_seq_len: int, dtype=None) -> KVCache:
    if max_seq_len > self.config.max_position_embeddings:
      raise ValueError(f"GPT2.init_cache: `max_seq_len` expected <= max_position_embeddings "
                       f"({self.config.max_position_embeddings}, the learned position table), "
                       f"got {max_seq_len}")
    return super().init_cache(batch_size, max_seq_len, dtype)

  # -- the pieces `Decoder` runs ----------------------------------------------------------------

  def _embed(self, tokens, positions):
    # Positions past the table read NaN (take's fill mode), never a silently clamped row.
    return (jnp.take(self.embed[...], tokens, axis=0)
            + jnp.take(self.pos_embed[...], positions, axis=0))

  def _norm(self, norm: LayerNorm, delta, h):
    """Pre-norm with the residual add fused: returns (norm(h + delta), h + delta)."""
    eps = self.config.layer_norm_eps
    if delta is None:
      return layer_norm(h, norm.weight[...], norm.bias[...], eps=eps, **self._kernel_args), h
    return layer_norm(delta, norm.weight[...], norm.bias[...], eps=eps, residual=h,
                      **self._kernel_args)

  def _layers(self, h, positions, attend):
    del positions  # absolute positions are already in h
    delta = None
    for index, layer in enumerate(self.layers):
      x, h = self._norm(layer.attn_norm, delta, h)
      q, k, v = layer.attn.qkv(x, self.config, self._kernel_args)
      delta = layer.attn.out(attend(index, q, k, v), self._kernel_args)
      x, h = self._norm(layer.mlp_norm, delta, h)
      delta = layer.mlp(x, self.config.activation, self._kernel_args)
    return delta, h

  def _logits(self, x):
    if self.lm_head is not None:
      return matmul(x, self.lm_head[...], out_dtype=jnp.float32, **self._kernel_args)
    return tied_logits(x, self.embed[...], self._kernel_args)
