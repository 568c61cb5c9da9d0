"""Which public function each `Case.op` names, and the audit cases of every op folder present.

Folders are imported lazily: an op folder that does not exist yet (or fails to import) is
skipped with a note, so the audit runs over whatever ops the tree has.

Backward kernels: a folder's `specs.GRAD_CASES` (optional) are cases of the same public ops
whose inputs end with the output cotangents, passed as keywords named `cotangent...` (see
`grad_of`). Their `audit=True` members are lowered as `grad_of(public op)`: the gradient of
the scalar loss sum(out * cotangent), i.e. the forward and the backward kernels together.

Mosaic GPU kernels: an op whose dispatch candidates (`implementations`) include "mosaic" has
its `audit=True` cases (GRAD_CASES included) that the implementation's `refuses` accepts
lowered with `impl="mosaic"` too (`mosaic_cases`); only the Mosaic kernels of that lowering
make Mosaic rows (a Triton backward paired with a Mosaic forward is in the Triton rows).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Callable

import numpy as np

from pallas_kernels._core import dispatch
from pallas_kernels._core.specs import Case, grad_of

# Case.op (the public function's name) -> folder under pallas_kernels/ops/.
OP_FOLDERS: dict[str, str] = {
    "attention": "attention",
    "decode_attention": "decode_attention",
    "paged_attention": "paged_attention",
    "matmul": "matmul",
    "gated_matmul": "matmul",
    "rms_norm": "normalization",
    "layer_norm": "normalization",
}

# Folders whose Mosaic GPU kernels are matrix products: their payload must hold wgmma.
WGMMA_EXPECTED: frozenset[str] = frozenset({"attention", "matmul"})


@dataclasses.dataclass(frozen=True)
class AuditCase:
  folder: str
  case: Case
  fn: Callable
  public: Callable | None = None  # the public op, when fn wraps it (grad_of); else fn is it

  @property
  def op(self) -> Callable:
    return self.public or self.fn


@dataclasses.dataclass(frozen=True)
class MosaicCase:
  """An audit case (forward or backward) the op's "mosaic" implementation accepts."""

  folder: str
  case: Case
  fn: Callable                # what to lower with impl="mosaic": the op, or grad_of(op)
  hopper_only: bool           # dispatch.Implementation.hopper_only: no sm_80 lowering
  wgmma_expected: bool
  grad: bool = False          # a GRAD_CASES member (inputs end with cotangents)


def folders() -> list[str]:
  """The registry's folders, then any other folder under ops/ (a new op is audited too)."""
  import pallas_kernels.ops as ops
  present = sorted(m.name for m in pkgutil.iter_modules(ops.__path__) if m.ispkg)
  return list(dict.fromkeys([*OP_FOLDERS.values(), *present]))


def _folder_exists(folder: str) -> bool:
  try:
    return importlib.util.find_spec(f"pallas_kernels.ops.{folder}.specs") is not None
  except ModuleNotFoundError:
    return False


def public_op(name: str, folder: str | None = None) -> Callable:
  """The public function `pallas_kernels.ops.<folder>.<name>` (folder from the registry)."""
  folder = OP_FOLDERS.get(name, folder)
  if folder is None:
    raise KeyError(f"audit: Case.op {name!r} has no folder; add it to "
                   f"pallas_kernels.audit.registry.OP_FOLDERS")
  module = importlib.import_module(f"pallas_kernels.ops.{folder}")
  if not hasattr(module, name):
    raise AttributeError(f"pallas_kernels.ops.{folder} has no public function {name!r} "
                         f"(Case.op of its specs)")
  return getattr(module, name)


def _matches(op_filter: str | None, folder: str, case: Case) -> bool:
  return op_filter is None or op_filter in (folder, case.op)


def _folder_wanted(op_filter: str | None, folder: str) -> bool:
  """`--op` names a folder, a registered op (its folder only), or an op of a new folder."""
  if op_filter is None or op_filter == folder:
    return True
  if op_filter in OP_FOLDERS:
    return OP_FOLDERS[op_filter] == folder
  return op_filter not in folders()


def audit_cases(op_filter: str | None = None, notes: list[str] | None = None,
                errors: list[str] | None = None) -> list[AuditCase]:
  """The `audit=True` cases of every op folder present (filtered by op or folder name).

  A missing folder adds to `notes`; a folder that is there but fails to import adds to
  `errors` (the audit then fails: a broken op must not pass by being skipped).
  """
  notes = [] if notes is None else notes
  errors = [] if errors is None else errors
  found = []
  for folder in folders():
    if not _folder_wanted(op_filter, folder):
      continue
    if not _folder_exists(folder):
      notes.append(f"pallas_kernels.ops.{folder} (specs.py) not found: its ops are not audited")
      continue
    try:
      specs = importlib.import_module(f"pallas_kernels.ops.{folder}.specs")
      audited = [c for c in specs.CASES if c.audit]
      cases = [c for c in audited if _matches(op_filter, folder, c)]
      found += [AuditCase(folder, c, public_op(c.op, folder)) for c in cases]
      grads = [c for c in getattr(specs, "GRAD_CASES", ()) if c.audit]
      found += [AuditCase(folder, c, grad_of(op), public=op)
                for c in grads if _matches(op_filter, folder, c)
                for op in [public_op(c.op, folder)]]
    except Exception as e:  # noqa: BLE001 (reported, and the audit fails)
      errors.append(f"pallas_kernels.ops.{folder}: {type(e).__name__}: {e}")
      continue
    if not audited:
      notes.append(f"pallas_kernels.ops.{folder}.specs has no audit=True case")
  return found


def split_args(case: Case, inputs: tuple) -> tuple[tuple, dict]:
  """(positional, keyword arrays) of one input set: `Case.split`."""
  return case.split(tuple(inputs))


def implementations(fn: Callable) -> tuple[dispatch.Implementation, ...]:
  """A public op's dispatch candidates: the module-level tuple of `dispatch.Implementation`s
  its body reads (`IMPLEMENTATIONS`, `_IMPLS`, `_MATMUL_IMPLS`, ...), or () if none."""
  fn = inspect.unwrap(fn)
  code, scope = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
  for name in code.co_names if code is not None else ():
    value = scope.get(name)
    if isinstance(value, (tuple, list)) and value and all(
        isinstance(v, dispatch.Implementation) for v in value):
      return tuple(value)
  return ()


def mosaic_implementation(fn: Callable) -> dispatch.Implementation | None:
  return next((c for c in implementations(fn) if c.name == "mosaic"), None)


def dispatch_args(fn: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """(args, kwargs) as the public op hands them to `dispatch.call` and so to `refuses`: its
  signature's defaults filled in, `impl` and `interpret` left out."""
  bound = inspect.signature(fn).bind(*args, **kwargs)
  bound.apply_defaults()
  for name in ("impl", "interpret"):
    bound.arguments.pop(name, None)
  return bound.args, bound.kwargs


def mosaic_cases(cases: list[AuditCase], notes: list[str] | None = None,
                 errors: list[str] | None = None) -> list[MosaicCase]:
  """The cases among `cases` whose op has a "mosaic" implementation that accepts them.

  Refused cases add one note per op (with each reason); a `refuses` that raises adds to
  `errors` (the audit then fails: the refusal must be able to judge its own audit cases).
  """
  notes = [] if notes is None else notes
  errors = [] if errors is None else errors
  found, refused = [], {}
  for audit_case in cases:
    case = audit_case.case
    op = audit_case.op
    impl = mosaic_implementation(op)
    if impl is None:
      continue
    args, arrays = split_args(case, case.abstract_inputs())
    arrays = {k: v for k, v in arrays.items() if not k.startswith("cotangent")}  # grad_of's
    try:
      args, kwargs = dispatch_args(op, args, {**case.kwargs, **arrays})
      reason = impl.refuses(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (reported, and the audit fails)
      errors.append(f"{case.op} | {case.label}: impl='mosaic' refuses() raised "
                    f"{type(e).__name__}: {e}")
      continue
    if reason:
      refused.setdefault(case.op, []).append(f"{case.label} ({reason})")
      continue
    found.append(MosaicCase(audit_case.folder, case, audit_case.fn, impl.hopper_only,
                            audit_case.folder in WGMMA_EXPECTED,
                            grad=any(k.startswith("cotangent") for k in case.array_kwargs)))
  for op, labels in refused.items():
    notes.append(f"{op}: impl='mosaic' refuses {len(labels)} audit case(s), no Mosaic row: "
                 + "; ".join(labels))
  return found
