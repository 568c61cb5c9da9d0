"""Config resolution in one place: explicit config, else the tuned table, else a heuristic.

Tuned tables live beside each op, `pallas_kernels/<op>/tuned/<device-slug>.json`,
written by `python -m pallas_kernels.autotune` on a GPU and versioned in the repo:

    {"version": 1, "op": "attention", "device_kind": "NVIDIA H100 80GB HBM3",
     "jax": "0.11.2", "entries": [{"key": {...}, "config": {...}, "time_ms": 0.12}]}

A key is a small dict of bucketed shape facts chosen by the op (e.g. head_dim,
dtype, causal, a power-of-two bucket of the sequence length).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pallas_kernels._core import device

TABLE_VERSION = 1
C = TypeVar("C")


def device_slug(device_kind: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
  return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")


def tuned_path(op_dir: str | Path, device_kind: str) -> Path:
  return Path(op_dir) / "tuned" / f"{device_slug(device_kind)}.json"


def _freeze(key: Mapping[str, Any]) -> tuple:
  return tuple(sorted((k, str(v)) for k, v in key.items()))


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict[tuple, dict]:
  p = Path(path)
  if not p.exists():
    return {}
  table = json.loads(p.read_text())
  if table.get("version") != TABLE_VERSION:
    raise ValueError(f"tuned table {p}: expected version {TABLE_VERSION}, got {table.get('version')}")
  return {_freeze(e["key"]): e["config"] for e in table["entries"]}


def lookup(op_dir: str | Path, key: Mapping[str, Any], target: device.Target | None = None) -> dict | None:
  target = target or device.current_target()
  if not target.is_gpu:
    return None
  return _load_table(str(tuned_path(op_dir, target.device_kind))).get(_freeze(key))


def resolve(config_cls: type[C], explicit: C | None, op_dir: str | Path, key: Mapping[str, Any],
            heuristic: Callable[[device.Target], C]) -> C:
  """The config a kernel call runs with."""
  if explicit is not None:
    if not isinstance(explicit, config_cls):
      raise TypeError(f"`config` expected {config_cls.__name__}, got {type(explicit).__name__}")
    return explicit
  target = device.current_target()
  tuned = lookup(op_dir, key, target)
  if tuned is not None:
    return config_cls(**tuned)
  return heuristic(target)


def write_table(op_dir: str | Path, op: str, device_kind: str, jax_version: str,
                entries: list[dict]) -> Path:
  """Write (replace) the tuned table for one op and device kind."""
  path = tuned_path(op_dir, device_kind)
  path.parent.mkdir(parents=True, exist_ok=True)
  table = {"version": TABLE_VERSION, "op": op, "device_kind": device_kind,
           "jax": jax_version, "entries": entries}
  path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
  _load_table.cache_clear()
  return path


def as_dict(config) -> dict:
  return dataclasses.asdict(config)
