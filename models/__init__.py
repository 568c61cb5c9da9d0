"""Models: Llama-family and GPT-2 decoders over pallas_kernels, their KV cache, loading (GGUF,
Hugging Face safetensors directories, our Orbax checkpoints), tokenizers.

    model, tokenizer = models.load("smollm2-135m")          # the embedded GGUF, float32, CPU/GPU
    logits = model(jnp.asarray([tokenizer.encode("Hi")], jnp.int32))
    models.save(model, tokenizer, "ckpt/"); models.load("ckpt/")   # Orbax, no re-conversion
    models.load("path/to/hf_dir")                            # config.json + *.safetensors
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from models import checkpoint, hf, registry
from models.checkpoint import save
from models.gpt2 import GPT2, GPT2Config
from models.hf import export as export_safetensors
from models.kv_cache import KVCache
from models.llama import Llama, LlamaConfig, decode_step, prefill_step
from models.rope import RopeScaling
from models.tokenizer import Tokenizer

__all__ = ["GPT2", "GPT2Config", "KVCache", "Llama", "LlamaConfig", "RopeScaling", "Tokenizer",
           "decode_step", "export_safetensors", "load", "prefill_step", "save", "LOADERS"]


def _is_gguf(path: Path) -> bool:
  return path.is_file() and path.suffix == ".gguf"


def _load_gguf(path: Path, *, dtype, impl, interpret):
  from models import gguf
  f = gguf.GGUFFile(path)
  return (gguf.load_llama(f, dtype=dtype, impl=impl, interpret=interpret),
          Tokenizer.from_gguf(f))


def _is_hf_dir(path: Path) -> bool:
  return path.is_dir() and (path / "config.json").is_file()


def _is_bare_orbax_dir(path: Path) -> bool:
  return path.is_dir() and ((path / "_CHECKPOINT_METADATA").exists()
                            or (path / "_METADATA").exists())


def _bare_orbax(path: Path, **kwargs):
  raise ValueError(f"models.load: {str(path)!r} is an Orbax checkpoint without "
                   f"{checkpoint.METADATA}: only directories written by `models.save` load (if "
                   f"this is the params/ folder of one, give its parent directory)")


# The dispatch point: (description, matches(path), load(path, dtype=, impl=, interpret=)) in
# order; the first match loads.
LOADERS: list[tuple[str, Callable[[Path], bool], Callable]] = [
    ("GGUF file", _is_gguf, _load_gguf),
    ("Hugging Face directory (config.json)", _is_hf_dir, hf.load),
    (f"models.save checkpoint ({checkpoint.METADATA})", checkpoint.is_checkpoint, checkpoint.load),
    ("Orbax checkpoint", _is_bare_orbax_dir, _bare_orbax),
]


def load(name_or_path: str | os.PathLike, *, dtype=None, impl: str | None = None,
         interpret: bool = False) -> tuple[Llama | GPT2, Tokenizer]:
  """A registered name (`models.registry.names()`) or a path -> (model, tokenizer).
  dtype: parameter dtype (default float32; for a `models.save` checkpoint, the saved dtype);
  impl/interpret: the kernels' backend for the model."""
  path = registry.resolve(name_or_path)
  for _, matches, loader in LOADERS:
    if matches(path):
      return loader(path, dtype=dtype, impl=impl, interpret=interpret)
  kinds = ", ".join(description for description, _, _ in LOADERS)
  raise ValueError(f"models.load: {str(path)!r} is none of: {kinds}")
