"""Our own checkpoints: parameters with Orbax, config and tokenizer beside them.

    models.save(model, tokenizer, "ckpt/")      # any family, any dtype
    model, tokenizer = models.load("ckpt/")      # no GGUF or safetensors re-read, no conversion

Layout of a checkpoint directory:
  params/            Orbax StandardCheckpointer: the pure-dict tree of the model's nnx.Params
  tokenizer/         tokenizer.json + tokenizer_config.json (special tokens, chat template)
  pallax_model.json  format version, model family, parameter dtype and config; written last, so
                     a directory that has it is complete (and it is what `models.load` looks for)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from models import hf
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from models.rope import RopeScaling
from models.tokenizer import Tokenizer

METADATA = "pallax_model.json"
FORMAT = "pallax-checkpoint"
VERSION = 1
FAMILIES = {"llama": (Llama, LlamaConfig), "gpt2": (GPT2, GPT2Config)}


def is_checkpoint(path: Path) -> bool:
  return path.is_dir() and (path / METADATA).is_file()


def save(model: Llama | GPT2, tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
  """Write `model` and `tokenizer` to `path`, a directory that must not exist or be empty."""
  import orbax.checkpoint as ocp
  from flax import nnx

  family = next((name for name, (cls, _) in FAMILIES.items() if type(model) is cls), None)
  if family is None:
    raise TypeError(f"models.save: `model` expected one of "
                    f"{', '.join(cls.__name__ for cls, _ in FAMILIES.values())}, "
                    f"got {type(model).__name__}")
  if not isinstance(tokenizer, Tokenizer):
    raise TypeError(f"models.save: `tokenizer` expected a models.Tokenizer, "
                    f"got {type(tokenizer).__name__}")
  path = Path(path).absolute()
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"models.save: `path` expected a new or empty directory, "
                          f"got {str(path)!r}, which exists and is not empty")
  path.mkdir(parents=True, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / "params", params)
    checkpointer.wait_until_finished()
  hf.write_tokenizer(tokenizer, path / "tokenizer")
  metadata = {"format": FORMAT, "version": VERSION, "family": family,
              "dtype": model.dtype.name, "config": dataclasses.asdict(model.config)}
  (path / METADATA).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
  return path


def read_metadata(path: str | os.PathLike) -> tuple[type, LlamaConfig | GPT2Config, str]:
  """pallax_model.json -> (model class, config, saved dtype name)."""
  file = Path(path) / METADATA
  where = str(file)
  try:
    meta = json.loads(file.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise FileNotFoundError(f"not a models.save checkpoint: {where!r} does not exist") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{where!r} is not valid JSON: {e}") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{where!r}: `format`/`version` expected {FORMAT!r}/{VERSION}, got "
                     f"{meta.get('format')!r}/{meta.get('version')!r}")
  if meta.get("family") not in FAMILIES:
    raise ValueError(f"{where!r}: `family` expected one of {', '.join(FAMILIES)}, "
                     f"got {meta.get('family')!r}")
  cls, config_cls = FAMILIES[meta["family"]]
  fields = dict(meta.get("config") or {})
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  try:
    config = config_cls(**fields)
  except TypeError as e:  # a field this version does not know, or one missing
    raise ValueError(f"{where!r}: `config` does not fit {config_cls.__name__}: {e}") from None
  return cls, config, meta.get("dtype", "float32")


def load_model(path: str | os.PathLike, *, dtype=None, impl: str | None = None,
               interpret: bool = False) -> Llama | GPT2:
  """Restore the parameters straight into a model built from the saved config, in `dtype`
  (default: the saved dtype; another one is converted by Orbax while restoring)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx, traverse_util

  path = Path(path).absolute()
  cls, config, saved_dtype = read_metadata(path)
  dtype = jnp.dtype(saved_dtype if dtype is None else dtype)
  abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, impl=impl, interpret=interpret,
                                        rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))  # {("layers", 0, ...): abstract}
  restored = _restore(path / "params", flat, jnp.dtype(saved_dtype).itemsize)
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(restored))
  return nnx.merge(graphdef, params)


def _restore(directory: Path, flat: dict, saved_itemsize: int) -> dict:
  """Orbax restore of the arrays `flat` describes, bounded in host memory: the bytes in flight
  are limited to two of the largest arrays (unbounded, every host buffer is alive at once, ~1.5x
  the parameters), and arrays over 1/16 of the total (embeddings of small models) are restored
  first, on their own: under the byte limit a large read waits until no small one is in flight,
  so it would otherwise come last, its host buffer on top of everything else."""
  import jax
  import orbax.checkpoint as ocp
  from flax import traverse_util

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  total = sum(x.size for x in flat.values())
  large = {k for k, x in flat.items() if 16 * x.size > total}
  phases = [[k for k in flat if k in large], [k for k in flat if k not in large]]
  # Orbax counts a read in the saved dtype, and refuses one larger than the limit.
  limit = 2 * max(x.size for x in flat.values()) * saved_itemsize + (1 << 20)
  handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit / 1e9)
  restored = {}
  with ocp.Checkpointer(handler) as checkpointer:
    for keys in filter(None, phases):
      item = traverse_util.unflatten_dict({k: flat[k] for k in keys})
      args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=sharding, dtype=x.dtype,
                                                         global_shape=x.shape), item)
      out = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
      restored |= traverse_util.flatten_dict(out)
  return restored


def load(path: str | os.PathLike, *, dtype=None, impl: str | None = None,
         interpret: bool = False) -> tuple[Llama | GPT2, Tokenizer]:
  model = load_model(path, dtype=dtype, impl=impl, interpret=interpret)
  return model, Tokenizer.from_tokenizer_json(Path(path) / "tokenizer" / hf.TOKENIZER)
