"""Which public function each `Case.op` names, and the audit cases of every op folder present.

Folders are imported lazily: an op folder that does not exist yet (or fails to import) is
skipped with a note, so the audit runs over whatever ops the tree has.

Backward kernels: a folder's `specs.GRAD_CASES` (optional) are cases of the same public ops
whose inputs end with the output cotangents, passed as keywords named `cotangent...` (see
`grad_of`). Their `audit=True` members are lowered as `grad_of(public op)`: the gradient of
the scalar loss sum(out * cotangent), i.e. the forward and the backward kernels together.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable

import numpy as np

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


@dataclasses.dataclass(frozen=True)
class AuditCase:
  folder: str
  case: Case
  fn: Callable


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
      found += [AuditCase(folder, c, grad_of(public_op(c.op, folder)))
                for c in grads if _matches(op_filter, folder, c)]
    except Exception as e:  # noqa: BLE001 (reported, and the audit fails)
      errors.append(f"pallas_kernels.ops.{folder}: {type(e).__name__}: {e}")
      continue
    if not audited:
      notes.append(f"pallas_kernels.ops.{folder}.specs has no audit=True case")
  return found


def split_args(case: Case, inputs: tuple) -> tuple[tuple, dict]:
  """(positional, keyword arrays) of one input set: `Case.split`."""
  return case.split(tuple(inputs))
