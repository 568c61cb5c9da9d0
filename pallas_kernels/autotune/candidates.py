"""Which configs to time: the op's own `candidates()`, else a generic grid around its default."""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

# Usual values of a config field, by name; the first pattern that matches wins. A suffix names
# the kernel a field belongs to (num_warps_dq, block_k_dkv: a backward config's two kernels).
USUAL_VALUES = (
    (r"num_warps(_.*)?", (1, 2, 4, 8, 16)),
    (r"num_stages(_.*)?", (1, 2, 3, 4, 5)),
    (r"block_.*rows?", (1, 2, 4, 8, 16, 32, 64)),
    (r"block(_.*)?", (16, 32, 64, 128, 256)),
    (r".*split.*", (1, 2, 4, 8, 16, 32, 64)),
    (r"group.*", (1, 4, 8, 16)),
)
DEFAULT_LIMIT = 24


def usual_values(field: dataclasses.Field) -> tuple | None:
  if field.type in (bool, "bool"):
    return (False, True)
  for pattern, values in USUAL_VALUES:
    if re.fullmatch(pattern, field.name):
      return values
  return None


def _centre(field: dataclasses.Field, default, values: tuple | None):
  if default is not None:
    return getattr(default, field.name)
  if field.default is not dataclasses.MISSING:
    return field.default
  if values is None:
    raise ValueError(f"config field `{field.name}` has no usual values, no dataclass default and "
                     f"no default config: the op needs `candidates()` or `autotune_default()`")
  return values[len(values) // 2]


def generic_grid(config_cls: type, default=None, limit: int = DEFAULT_LIMIT) -> list:
  """Valid configs nearest `default` first (distance: steps along each field's value list)."""
  axes = []
  for field in dataclasses.fields(config_cls):
    values = usual_values(field)
    centre = _centre(field, default, values)
    values = sorted(set(values or ()) | {centre})
    axes.append((field.name, values, values.index(centre)))

  def distance(combo: tuple[int, ...]) -> tuple:
    return sum(abs(i - centre) for i, (_, _, centre) in zip(combo, axes)), combo

  configs = []
  for combo in sorted(itertools.product(*(range(len(v)) for _, v, _ in axes)), key=distance):
    try:
      configs.append(config_cls(**{name: values[i] for i, (name, values, _) in zip(combo, axes)}))
    except (ValueError, TypeError):  # the dataclass refuses it: not a candidate
      continue
    if len(configs) >= limit:
      break
  return configs


def enumerate_configs(adapter, target, args: tuple, kwargs: dict,
                      limit: int = DEFAULT_LIMIT) -> list[Any]:
  """The default config first (when known), then the op's or the generic candidates, deduped."""
  default = adapter.default(target, *args, **kwargs) if adapter.default else None
  if adapter.candidates is not None:
    found = list(adapter.candidates(target, *args, **kwargs))
  else:
    found = generic_grid(adapter.config_cls, default, limit)
  ordered = list(dict.fromkeys(([default] if default is not None else []) + found))
  return ordered[:limit]
