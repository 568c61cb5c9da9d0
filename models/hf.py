"""Hugging Face checkpoint directories: config.json, *.safetensors (one file or shards with
model.safetensors.index.json) and tokenizer.json (+ tokenizer_config.json, chat_template.jinja).

    model = hf.load_model(directory, dtype="bfloat16")     # model, tokenizer = models.load(dir)
    hf.export(model, tokenizer, directory)                  # the inverse: write such a directory

Architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM -> `Llama`;
GPT2LMHeadModel -> `GPT2`. Weights are read with `safetensors.safe_open`, one parameter at a
time: its source tensors are read (each shard mapped for that read only), converted to the target
dtype straight into the parameter's layout, placed on the device, and dropped before the next, so
loading holds the model plus about one parameter's host copies. Nothing is ever unpickled.

The name mapping is one table per family (`_llama_slots`, `_gpt2_slots`) used both ways: each of
our parameters is a `Slot` of one or more Hugging Face tensors, read as stored ([in, out]: GPT-2's
Conv1D) or transposed (torch Linear [out, in]), and concatenated along the last axis (Q|K|V).
Llama Q/K weights in Hugging Face files are in the rotate_half layout that `models.rope` uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from models.tokenizer import Tokenizer

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
# Buffers some checkpoints carry that are not weights: GPT-2's causal-mask tables, old RoPE tables.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_DTYPES = ("F32", "F16", "BF16")  # read as stored, converted to the model dtype


@dataclasses.dataclass(frozen=True)
class Slot:
  """One of our parameters (`path` in the module tree) from Hugging Face `sources`: (name,
  stored shape) pairs, each transposed if `transpose`, concatenated along the last axis."""

  path: tuple[str | int, ...]
  sources: tuple[tuple[str, tuple[int, ...]], ...]
  transpose: bool = False


# -- config.json ------------------------------------------------------------------------------

def read_config(directory: str | os.PathLike) -> LlamaConfig | GPT2Config:
  """config.json -> our config, by `architectures` (or `model_type` when that is absent)."""
  path = Path(directory) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"Hugging Face directory {str(Path(directory))!r} has no {CONFIG}")
  try:
    hf = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
  architecture = _architecture(hf, path)
  if ARCHITECTURES[architecture] == "gpt2":
    return GPT2Config.from_hf_dict(hf)
  return LlamaConfig.from_hf_dict(_llama_dict(hf, path))


def _architecture(hf: dict, path: Path) -> str:
  names = hf.get("architectures")
  supported = ", ".join(ARCHITECTURES)
  if not names:
    model_type = hf.get("model_type")
    if model_type in _MODEL_TYPES:
      return _MODEL_TYPES[model_type]
    raise ValueError(f"{str(path)!r}: no `architectures` field and `model_type` = {model_type!r}; "
                     f"expected one of the architectures {supported}")
  name = names[0] if isinstance(names, list) else names
  if name not in ARCHITECTURES:
    raise ValueError(f"{str(path)!r}: `architectures` = {names!r} is not supported; "
                     f"supported: {supported}")
  return name


def _llama_dict(hf: dict, path: Path) -> dict:
  """Checks what `LlamaConfig` cannot express, and reads transformers >= 5's `rope_parameters`
  (theta and scaling in one dict) as the older `rope_theta` + `rope_scaling`."""
  for field, supported in (("hidden_act", "silu"), ("mlp_bias", False)):
    if hf.get(field, supported) != supported:
      raise ValueError(f"{str(path)!r}: `{field}` = {hf[field]!r} is not supported "
                       f"(expected {supported!r})")
  rope = hf.get("rope_parameters")
  if rope is None:
    return hf
  if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
    raise ValueError(f"{str(path)!r}: `rope_parameters` expected one flat dict, got {rope!r}")
  hf = dict(hf)
  hf["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  return hf


def config_to_hf(config: LlamaConfig | GPT2Config) -> dict[str, Any]:
  """Our config -> a config.json dict that transformers and `read_config` read back."""
  if isinstance(config, GPT2Config):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_embd": config.hidden_size,
            "n_layer": config.num_layers, "n_head": config.num_heads,
            "n_inner": config.intermediate_size, "n_positions": config.max_position_embeddings,
            "layer_norm_epsilon": config.layer_norm_eps,
            "activation_function": {"gelu_tanh": "gelu_new"}.get(config.activation,
                                                                  config.activation),
            "tie_word_embeddings": config.tie_word_embeddings}
  model_type = "qwen2" if config.qkv_bias else "mistral" if config.sliding_window else "llama"
  scaling = config.rope_scaling
  return {"architectures": [_MODEL_TYPES[model_type]], "model_type": model_type,
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
          "rope_theta": config.rope_theta, "hidden_act": "silu",
          "rope_scaling": None if scaling is None else {
              "rope_type": scaling.kind, "factor": scaling.factor,
              "low_freq_factor": scaling.low_freq_factor,
              "high_freq_factor": scaling.high_freq_factor,
              "original_max_position_embeddings": scaling.original_max_position_embeddings},
          "max_position_embeddings": config.max_position_embeddings,
          "tie_word_embeddings": config.tie_word_embeddings,
          "sliding_window": config.sliding_window,
          "use_sliding_window": config.sliding_window is not None}


# -- the name tables ----------------------------------------------------------------------------

def _llama_slots(c: LlamaConfig) -> list[Slot]:
  q, kv, hidden, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, \
      c.intermediate_size
  slots = [Slot(("embed",), (("model.embed_tokens.weight", (c.vocab_size, hidden)),)),
           Slot(("final_norm",), (("model.norm.weight", (hidden,)),))]
  if not c.tie_word_embeddings:
    slots.append(Slot(("lm_head",), (("lm_head.weight", (c.vocab_size, hidden)),), True))
  for i in range(c.num_layers):
    p, at = f"model.layers.{i}.", ("layers", i)
    attn = p + "self_attn."
    slots += [
        Slot(at + ("attn_norm",), ((p + "input_layernorm.weight", (hidden,)),)),
        Slot(at + ("mlp_norm",), ((p + "post_attention_layernorm.weight", (hidden,)),)),
        Slot(at + ("attn", "wqkv"), ((attn + "q_proj.weight", (q, hidden)),
                                     (attn + "k_proj.weight", (kv, hidden)),
                                     (attn + "v_proj.weight", (kv, hidden))), True),
        Slot(at + ("attn", "wo"), ((attn + "o_proj.weight", (hidden, q)),), True),
        Slot(at + ("mlp", "w_gate"), ((p + "mlp.gate_proj.weight", (inter, hidden)),), True),
        Slot(at + ("mlp", "w_up"), ((p + "mlp.up_proj.weight", (inter, hidden)),), True),
        Slot(at + ("mlp", "w_down"), ((p + "mlp.down_proj.weight", (hidden, inter)),), True)]
    if c.qkv_bias:
      slots.append(Slot(at + ("attn", "bqkv"), ((attn + "q_proj.bias", (q,)),
                                                (attn + "k_proj.bias", (kv,)),
                                                (attn + "v_proj.bias", (kv,)))))
  return slots


def _gpt2_slots(c: GPT2Config, prefix: str = "transformer.") -> list[Slot]:
  hidden, inter = c.hidden_size, c.intermediate_size

  def norm(at, name):
    return [Slot(at + ("weight",), ((name + ".weight", (hidden,)),)),
            Slot(at + ("bias",), ((name + ".bias", (hidden,)),))]

  slots = [Slot(("embed",), ((prefix + "wte.weight", (c.vocab_size, hidden)),)),
           Slot(("pos_embed",), ((prefix + "wpe.weight", (c.max_position_embeddings, hidden)),)),
           *norm(("final_norm",), prefix + "ln_f")]
  if not c.tie_word_embeddings:
    slots.append(Slot(("lm_head",), (("lm_head.weight", (c.vocab_size, hidden)),), True))
  for i in range(c.num_layers):
    p, at = f"{prefix}h.{i}.", ("layers", i)
    slots += [
        *norm(at + ("attn_norm",), p + "ln_1"), *norm(at + ("mlp_norm",), p + "ln_2"),
        # Conv1D weights are stored [in, out]: no transpose.
        Slot(at + ("attn", "wqkv"), ((p + "attn.c_attn.weight", (hidden, 3 * hidden)),)),
        Slot(at + ("attn", "bqkv"), ((p + "attn.c_attn.bias", (3 * hidden,)),)),
        Slot(at + ("attn", "wo"), ((p + "attn.c_proj.weight", (hidden, hidden)),)),
        Slot(at + ("attn", "bo"), ((p + "attn.c_proj.bias", (hidden,)),)),
        Slot(at + ("mlp", "w_in"), ((p + "mlp.c_fc.weight", (hidden, inter)),)),
        Slot(at + ("mlp", "b_in"), ((p + "mlp.c_fc.bias", (inter,)),)),
        Slot(at + ("mlp", "w_out"), ((p + "mlp.c_proj.weight", (inter, hidden)),)),
        Slot(at + ("mlp", "b_out"), ((p + "mlp.c_proj.bias", (hidden,)),))]
  return slots


def slots_for(config: LlamaConfig | GPT2Config, names=()) -> list[Slot]:
  """The table for `config`; `names` (the file's tensor names) picks GPT-2's prefix: the
  original checkpoints have none, `save_pretrained` of GPT2LMHeadModel writes "transformer."."""
  if isinstance(config, GPT2Config):
    bare = "wte.weight" in names and "transformer.wte.weight" not in names
    return _gpt2_slots(config, "" if bare else "transformer.")
  return _llama_slots(config)


# -- safetensors ------------------------------------------------------------------------------

class SafetensorsFiles:
  """The tensors of a directory, single-file or sharded, by name.

  Each read maps its shard for that read only (`safe_open` per tensor, which parses just the
  header): the pages of a mapping count in the process's RSS for as long as it stays open, so one
  mapping held across the whole load would add the file's size to the peak."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    index, single = self.directory / INDEX, self.directory / SINGLE
    if index.is_file():
      weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{str(index)!r}: `weight_map` expected a non-empty dict of tensor name "
                         f"-> shard file")
      shards = sorted(set(weight_map.values()))
      for shard in shards:
        if not (self.directory / shard).is_file():
          raise FileNotFoundError(f"{str(index)!r} names shard {shard!r}, which does not exist "
                                  f"in {str(self.directory)!r}")
    elif single.is_file():
      weight_map, shards = None, [SINGLE]
    else:
      raise FileNotFoundError(f"Hugging Face directory {str(self.directory)!r} has neither "
                              f"{SINGLE} nor {INDEX}")
    self.where: dict[str, str] = {}  # tensor name -> shard, from the shards' own headers
    for shard in shards:
      with safe_open(str(self.directory / shard), framework="numpy") as f:
        self.where.update((name, shard) for name in f.keys())
    for name, shard in (weight_map or {}).items():
      if self.where.get(name) != shard:
        raise ValueError(f"{str(index)!r} puts tensor {name!r} in {shard!r}, which does not "
                         f"have it")

  def names(self) -> frozenset[str]:
    return frozenset(self.where)

  def read(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    """The tensor as stored (float32, float16 or bfloat16), after checking name, dtype, shape."""
    if name not in self.where:
      raise ValueError(f"Hugging Face directory {str(self.directory)!r}: tensor {name!r} is "
                       f"missing (expected shape {tuple(expected_shape)})")
    shard = self.where[name]
    with safe_open(str(self.directory / shard), framework="numpy") as f:
      view = f.get_slice(name)
      shape, dtype = tuple(view.get_shape()), view.get_dtype()
      if shape != tuple(expected_shape):
        raise ValueError(f"tensor {name!r} in {shard!r}: expected shape "
                         f"{tuple(expected_shape)}, got {shape}")
      if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r} in {shard!r}: dtype {dtype} is not supported; "
                         f"supported: {', '.join(_DTYPES)}")
      return f.get_tensor(name)


def _param(model, path: tuple[str | int, ...]):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _assemble(files: SafetensorsFiles, slot: Slot, shape: tuple[int, ...], dtype) -> np.ndarray:
  """The slot's sources converted into one host array of `shape` and `dtype`, one source at a
  time (each dropped once copied in)."""
  if len(slot.sources) == 1 and not slot.transpose:
    return files.read(*slot.sources[0]).astype(dtype, copy=False)
  out = np.empty(shape, dtype)
  at = 0
  for name, stored in slot.sources:
    source = files.read(name, stored)
    width = stored[0] if slot.transpose else stored[-1]
    out[..., at:at + width] = source.T if slot.transpose else source
    at += width
    del source
  if at != shape[-1]:
    raise ValueError(f"{slot.path}: sources {[n for n, _ in slot.sources]} give {at} columns, "
                     f"the parameter has {shape[-1]}")
  return out


def load_model(directory: str | os.PathLike, *, dtype=None, impl: str | None = None,
               interpret: bool = False) -> Llama | GPT2:
  """A Hugging Face directory's config.json + safetensors -> our model (dtype default float32)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"Hugging Face directory does not exist: {str(directory)!r}")
  config = read_config(directory)
  family = GPT2 if isinstance(config, GPT2Config) else Llama
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  model = nnx.eval_shape(lambda: family(config, dtype=dtype, impl=impl, interpret=interpret,
                                        rngs=nnx.Rngs(0)))
  files = SafetensorsFiles(directory)
  slots = slots_for(config, files.names())
  _check_names(files, slots, directory)
  for slot in slots:
    param = _param(model, slot.path)
    host = _assemble(files, slot, tuple(param.get_value().shape), dtype)
    param.set_value(jnp.asarray(host))
    del host
  unset = [path for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Param) and isinstance(node.get_value(), jax.ShapeDtypeStruct)]
  if unset:  # a parameter the name table misses: a bug here, not bad input
    raise RuntimeError(f"models.hf: no Hugging Face tensor fills parameter {unset[0]}")
  return model


def _check_names(files: SafetensorsFiles, slots: list[Slot], directory: Path):
  wanted = {name: shape for slot in slots for name, shape in slot.sources}
  present = files.names()
  missing = [name for name in wanted if name not in present]
  if missing:
    raise ValueError(f"Hugging Face directory {str(directory)!r}: tensor {missing[0]!r} is "
                     f"missing (expected shape {wanted[missing[0]]}"
                     f"{f'; and {len(missing) - 1} more' if len(missing) > 1 else ''})")
  extra = sorted(n for n in present - set(wanted)
                 if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight")
  if extra:  # weights this architecture does not have: a config we misread, or a variant
    raise ValueError(f"Hugging Face directory {str(directory)!r}: tensors the loader does not "
                     f"know: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
  # "lm_head.weight" beside a tied head is a saved copy of the embedding: ignored.


# -- tokenizer --------------------------------------------------------------------------------

def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  path = Path(directory) / TOKENIZER
  if not path.is_file():
    raise FileNotFoundError(f"directory {str(Path(directory))!r} has no {TOKENIZER} (the "
                            f"Hugging Face fast-tokenizer file; slow-tokenizer files alone are "
                            f"not supported)")
  return Tokenizer.from_tokenizer_json(path)


def write_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
  """tokenizer.json (the whole pipeline) + tokenizer_config.json (special tokens, chat template),
  which `Tokenizer.from_tokenizer_json` reads back."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.hf.save(str(directory / TOKENIZER))
  config = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "chat_template": tokenizer.chat_template}
  (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1, ensure_ascii=False)
                                            + "\n", encoding="utf-8")


def load(directory: str | os.PathLike, *, dtype=None, impl: str | None = None,
         interpret: bool = False) -> tuple[Llama | GPT2, Tokenizer]:
  """The whole directory: (model, tokenizer); config.json and the tokenizer are checked before
  any weight is read."""
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"Hugging Face directory does not exist: {str(directory)!r}")
  read_config(directory)
  tokenizer = load_tokenizer(directory)
  return load_model(directory, dtype=dtype, impl=impl, interpret=interpret), tokenizer


# -- export -----------------------------------------------------------------------------------

def _tensors(model, slots: list[Slot]) -> Iterator[tuple[str, np.ndarray]]:
  for slot in slots:
    value = np.asarray(_param(model, slot.path).get_value())
    at = 0
    for name, stored in slot.sources:
      width = stored[0] if slot.transpose else stored[-1]
      part = value[..., at:at + width]
      yield name, np.ascontiguousarray(part.T if slot.transpose else part)
      at += width


def export(model: Llama | GPT2, tokenizer: Tokenizer | None, directory: str | os.PathLike) -> Path:
  """Write `model` (and `tokenizer`) as a Hugging Face directory: config.json, model.safetensors
  in the model's dtype, tokenizer files. For tests and load measurements; transformers reads it."""
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(model.config) | {"torch_dtype": model.dtype.name}
  (directory / CONFIG).write_text(json.dumps(hf_config, indent=1) + "\n", encoding="utf-8")
  save_file(dict(_tensors(model, slots_for(model.config))), str(directory / SINGLE),
            metadata={"format": "pt"})
  if tokenizer is not None:
    write_tokenizer(tokenizer, directory)
  return directory
