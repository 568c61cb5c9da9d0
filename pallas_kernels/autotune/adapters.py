"""How autotune talks to one public op: its config class, tuning key, default and candidates.

Hooks in the op's config.py win (see the package docstring); `BUILTIN` covers the ops that
predate those hooks, written against their config.py as it stands. Built-ins receive the
public call's arguments by name (`inspect.signature(...).bind` with defaults applied).

A backward adapter (`adapter_for(..., backward=True)`) tunes the config the public op takes
as `bwd_config=`, from the op's GRAD_CASES: hooks `autotune_bwd_key`, `autotune_bwd_default`
and `bwd_candidates` in the folder's config_bwd.py (else config.py), else `BUILTIN_BWD`.
Cotangent arrays of a grad case (keywords `cotangent...`) never reach a key, default or
candidates function: they are the loss's, not the op's.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

from pallas_kernels.bench.registry import OpFolder


@dataclasses.dataclass(frozen=True)
class Adapter:
  folder: OpFolder
  op: str                                        # public op name
  config_cls: type
  key: Callable[..., dict]                       # (*args, **kwargs) -> tuning key
  default: Callable[..., Any] | None = None      # (target, *args, **kwargs) -> config
  candidates: Callable[..., Iterable] | None = None  # (target, *args, **kwargs) -> configs
  impl: str = "triton"
  backward: bool = False  # GRAD_CASES, timed as grad_of(op), candidates passed as bwd_config=

  @property
  def config_kwarg(self) -> str:
    """The public op's keyword the candidates are passed as."""
    return "bwd_config" if self.backward else "config"


class NotTunable(LookupError):
  pass


class NoBackwardConfig(NotTunable):
  """The op's backward kernels take no config of their own (say how they are configured)."""


def config_class(module) -> type:
  """The one frozen dataclass that config.py defines."""
  found = [v for v in vars(module).values()
           if isinstance(v, type) and dataclasses.is_dataclass(v)
           and v.__module__ == module.__name__ and v.__dataclass_params__.frozen]
  if len(found) != 1:
    raise NotTunable(f"{module.__name__}: expected one frozen config dataclass, "
                     f"found {[c.__name__ for c in found]}")
  return found[0]


# Built-ins: (folder, op) -> (key(cfg_module, a), default(cfg_module, target, a)), `a` the
# public call's arguments by name.
def _rows(shape) -> int:
  return math.prod(shape[:-1])


def _norm(kind: str):
  def key(m, a):
    x = a["x"]
    return m.tuning_key(x.shape[-1], x.dtype, a["residual"] is not None, kind)
  return key, lambda m, t, a: m.heuristic(t, a["x"].shape[-1])


def _attention(key_fn: str = "tuning_key"):
  """config.py's `tuning_key` (forward) or config_bwd.py's `bwd_tuning_key` (backward)."""
  def key(m, a):
    q, k = a["q"], a["k"]
    return getattr(m, key_fn)(head_dim=q.shape[-1], dtype=q.dtype, causal=a["causal"],
                              q_len=q.shape[1], kv_len=k.shape[1])
  return key, lambda m, t, a: m.heuristic(t, head_dim=a["q"].shape[-1], dtype=a["q"].dtype)


def _matmul(weight: str, gated: bool):
  def sizes(a):
    x, w = a["x"], a[weight]
    return _rows(x.shape), w.shape[1], x.shape[-1], x.dtype
  return (lambda m, a: m.tuning_key(*sizes(a), gated),
          lambda m, t, a: m.heuristic(t, *sizes(a), gated))


def _decode_attention():
  def sizes(a):
    q, k_cache = a["q"], a["k_cache"]
    batch, num_heads, head_dim = q.shape
    max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    return dict(batch=batch, num_kv_heads=num_kv_heads, max_len=max_len, head_dim=head_dim,
                dtype=q.dtype), num_heads // num_kv_heads
  def key(m, a):
    s, group = sizes(a)
    return m.tuning_key(head_dim=s["head_dim"], dtype=s["dtype"], group=group,
                        num_kv_heads=s["num_kv_heads"], max_len=s["max_len"], batch=s["batch"])
  return key, lambda m, t, a: m.heuristic(t, **sizes(a)[0])


BUILTIN = {
    ("normalization", "rms_norm"): _norm("rms"),
    ("normalization", "layer_norm"): _norm("layer"),
    ("attention", "attention"): _attention(),
    ("matmul", "matmul"): _matmul("w", gated=False),
    ("matmul", "gated_matmul"): _matmul("w_gate", gated=True),
    ("decode_attention", "decode_attention"): _decode_attention(),
}

# Backward built-ins, against the folder's config_bwd.py (else config.py).
BUILTIN_BWD = {
    ("attention", "attention"): _attention("bwd_tuning_key"),
}

_MATMUL_BWD = ("its backward kernels (dx = dz w^T, dw = x^T dz) take no bwd_config: they resolve "
               "MatmulConfig from the forward table under their own (m, n, k) with "
               "variant 'dx'/'dw' in the key, which autotune does not time (heuristic until "
               "tuned)")
# Public ops whose backward has no config of its own: why, for the listing.
NO_BWD_CONFIG = {("matmul", "matmul"): _MATMUL_BWD, ("matmul", "gated_matmul"): _MATMUL_BWD}

HOOKS = ("autotune_key", "autotune_default", "candidates")
BWD_HOOKS = ("autotune_bwd_key", "autotune_bwd_default", "bwd_candidates")


def _by_name(fn: Callable, args, kwargs) -> dict:
  bound = inspect.signature(fn).bind(*args, **kwargs)
  bound.apply_defaults()
  return dict(bound.arguments)


def without_cotangents(kwargs: dict) -> dict:
  """A grad case's call minus the cotangents `_core.specs.grad_of` takes out before the op."""
  return {k: v for k, v in kwargs.items() if not k.startswith("cotangent")}


def backward_module(folder: OpFolder):
  """Where the backward config lives: config_bwd.py when the folder has one, else config.py."""
  if (folder.path / "config_bwd.py").exists():
    return importlib.import_module(f"pallas_kernels.ops.{folder.name}.config_bwd")
  return folder.config


def adapter_for(folder: OpFolder, op: str, backward: bool = False) -> Adapter:
  """Hooks of the op's config module first, then the built-in adapter; NotTunable when neither."""
  if folder.error:
    raise NotTunable(f"ops/{folder.name} failed to load: {folder.error}")
  if backward and (folder.name, op) in NO_BWD_CONFIG:
    raise NoBackwardConfig(NO_BWD_CONFIG[folder.name, op])
  module = backward_module(folder) if backward else folder.config
  if module is None:
    raise NotTunable(f"ops/{folder.name} has no config.py")
  cls = config_class(module)
  key_name, default_name, candidates_name = BWD_HOOKS if backward else HOOKS
  hook_key = getattr(module, key_name, None)
  hook_default = getattr(module, default_name, None)
  hook_candidates = getattr(module, candidates_name, None)
  builtin = (BUILTIN_BWD if backward else BUILTIN).get((folder.name, op))
  if hook_key is None and builtin is None:
    raise NotTunable(f"ops/{folder.name}: no `{key_name}(op, *args, **kwargs)` in "
                     f"{module.__name__.rsplit('.', 1)[-1]}.py and no built-in "
                     f"{'backward ' * backward}adapter for {op!r}")
  public = folder.public_fn(op)

  def key(*args, **kwargs) -> dict | None:
    kwargs = without_cotangents(kwargs)
    if hook_key is not None:
      return hook_key(op, *args, **kwargs)
    return builtin[0](module, _by_name(public, args, kwargs))

  def default(target, *args, **kwargs):
    kwargs = without_cotangents(kwargs)
    if hook_default is not None:
      return hook_default(target, *args, **kwargs)
    return builtin[1](module, target, _by_name(public, args, kwargs))

  def candidates(target, *args, **kwargs):
    return hook_candidates(target, *args, **without_cotangents(kwargs))

  has_default = hook_default is not None or builtin is not None
  return Adapter(folder, op, cls, key, default if has_default else None,
                 candidates if hook_candidates is not None else None, backward=backward)
