"""The one dispatch point: `impl=` names an implementation, `None` picks the best that fits.

Every public op declares its implementations in order of preference. A Pallas
implementation runs on a GPU, or anywhere with `interpret=True`; "xla" (the
plain-JAX reference) runs everywhere. When `impl=None` finds nothing but xla the
result is still correct, only slower; when an explicit `impl` cannot run the
call, the error says why instead of silently falling back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from pallas_kernels._core import device

IMPL_NAMES = ("xla", "triton", "mosaic")
# Keyword arguments that configure a Pallas kernel; `call` does not pass them to "xla".
KERNEL_CONFIG_KWARGS = ("config", "bwd_config")


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute an op.

  `fn` takes the op's arguments plus, for Pallas implementations, `interpret=`.
  `refuses(*args, **kwargs)` returns a reason this implementation cannot run
  the call (shape, dtype, target), or None when it can.
  """

  name: str
  fn: Callable[..., Any]
  is_pallas: bool = True
  hopper_only: bool = False
  refuses: Callable[..., str | None] = lambda *args, **kwargs: None


def _target_reason(candidate: Implementation, interpret: bool) -> str | None:
  if not candidate.is_pallas or interpret:
    return None
  target = device.current_target()
  if not target.is_gpu:
    return (f"impl={candidate.name!r} needs an NVIDIA GPU, but the current device is "
            f"{target.platform!r}; pass interpret=True to run the kernel in interpret mode")
  if candidate.hopper_only and not target.is_hopper:
    return (f"impl={candidate.name!r} needs a Hopper GPU (sm_90), got {target.device_kind!r}")
  return None


def _default_order(candidates: Sequence[Implementation], interpret: bool) -> list[Implementation]:
  pallas = [c for c in candidates if c.is_pallas]
  xla = [c for c in candidates if not c.is_pallas]
  if interpret or device.current_target().is_gpu:
    return pallas + xla
  return xla


def select(op: str, impl: str | None, interpret: bool,
           candidates: Sequence[Implementation], *args, **kwargs) -> Implementation:
  """Pick the implementation of `op` that runs this call, or raise saying why none can."""
  if not isinstance(interpret, bool):
    raise TypeError(f"{op}: `interpret` expected a bool, got {type(interpret).__name__}")
  by_name = {c.name: c for c in candidates}
  if impl is not None:
    if impl not in IMPL_NAMES:
      raise ValueError(f"{op}: `impl` expected one of {IMPL_NAMES} or None, got {impl!r}")
    if impl not in by_name:
      raise ValueError(f"{op}: impl={impl!r} is not implemented for this op; "
                       f"available: {tuple(by_name)}")
    chosen = by_name[impl]
    reason = _target_reason(chosen, interpret) or chosen.refuses(*args, **kwargs)
    if reason:
      raise ValueError(f"{op}: {reason}")
    return chosen
  refusals = []
  for candidate in _default_order(candidates, interpret):
    reason = _target_reason(candidate, interpret) or candidate.refuses(*args, **kwargs)
    if reason is None:
      return candidate
    refusals.append(f"{candidate.name}: {reason}")
  raise ValueError(f"{op}: no implementation can run this call: " + "; ".join(refusals))


def call(op: str, impl: str | None, interpret: bool,
         candidates: Sequence[Implementation], *args, **kwargs):
  """Select an implementation and run it."""
  chosen = select(op, impl, interpret, candidates, *args, **kwargs)
  if chosen.is_pallas:
    return chosen.fn(*args, interpret=interpret, **kwargs)
  # Tiles, warps and stages mean nothing to XLA: the reference takes no kernel configs.
  plain = {k: v for k, v in kwargs.items() if k not in KERNEL_CONFIG_KWARGS}
  return chosen.fn(*args, **plain)
