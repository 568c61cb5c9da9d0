"""Every op folder's shape catalogue, public functions and peers.

An op folder is `pallas_kernels/ops/<folder>/` with a `specs.py`. From it we use:
  specs.CASES               list[_core.specs.Case]; `case.op` names the public function
  specs.GRAD_CASES          optional: backward cases of the same public functions, timed as
                            `_core.specs.grad_of(fn)` (forward + vjp with the cotangents
                            their inputs end with), every peer the same way
  specs.peers()             dict[name, fn] taking the public op's arguments, optional
  Case.bind(inputs)         -> (args, kwargs) of the public call: trailing inputs named in
                            `case.array_kwargs` (e.g. `residual`) are passed as keywords
  <folder package>.<op>     the public function, called with `impl=` (and `config=` by autotune)
  config.py                 only autotune reads it (see `pallas_kernels.autotune`)
A folder whose modules fail to import is kept with its error, so a listing shows it
instead of hiding it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pallas_kernels.ops
from pallas_kernels._core.specs import grad_of

OPS_DIR = Path(pallas_kernels.ops.__path__[0])


@dataclasses.dataclass
class OpFolder:
  """One op folder: its package (public functions), specs and config modules."""

  name: str                  # folder name, e.g. "normalization"
  path: Path
  package: Any = None        # module (or any object) holding the public functions
  specs: Any = None          # module with CASES and peers()
  config: Any = None         # config module, None when the folder has none
  error: str | None = None   # why the folder could not be loaded

  @property
  def cases(self) -> list:
    return list(getattr(self.specs, "CASES", ())) if self.specs is not None else []

  @property
  def grad_cases(self) -> list:
    return list(getattr(self.specs, "GRAD_CASES", ())) if self.specs is not None else []

  def is_grad_case(self, case) -> bool:
    return any(case is c for c in self.grad_cases)

  @property
  def public_ops(self) -> list[str]:
    return sorted({case.op for case in self.cases})

  def public_fn(self, op: str) -> Callable:
    fn = getattr(self.package, op, None)
    if fn is None:
      raise LookupError(f"ops/{self.name}: no public function {op!r} in its package")
    return fn

  def bind(self, case, inputs: tuple) -> tuple[tuple, dict]:
    """The public call's (args, kwargs) for one input set of `case`."""
    return case.bind(tuple(inputs))

  def bound(self, case, fn: Callable) -> Callable:
    """`fn` taking one input set of `case` positionally, as jit wants its arrays (its
    gradient, `grad_of(fn)`, for a grad case)."""
    if self.is_grad_case(case):
      fn = grad_of(fn)

    def call(*inputs):
      args, kwargs = self.bind(case, inputs)
      return fn(*args, **kwargs)
    return call

  def peers(self) -> dict[str, Callable]:
    """specs.peers(), or {} when the op defines none; raises what peers() raises."""
    make = getattr(self.specs, "peers", None)
    return dict(make()) if make is not None else {}


def folder_names() -> list[str]:
  """Op folders that have a specs.py, sorted."""
  return sorted(p.parent.name for p in OPS_DIR.glob("*/specs.py"))


def short_error(exc: BaseException, limit: int = 2000) -> str:
  """`Type: message`, without jax's note on filtered traceback frames."""
  text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
  return text.split("\n--------------------")[0].strip()[:limit]


def load_folder(name: str) -> OpFolder:
  folder = OpFolder(name, OPS_DIR / name)
  base = f"pallas_kernels.ops.{name}"
  try:
    folder.package = importlib.import_module(base)
    folder.specs = importlib.import_module(f"{base}.specs")
    if (folder.path / "config.py").exists():
      folder.config = importlib.import_module(f"{base}.config")
  except Exception as exc:  # a half-written op must not hide the others
    folder.error = short_error(exc)
  return folder


def load(names: Iterable[str] | None = None) -> list[OpFolder]:
  return [load_folder(n) for n in (folder_names() if names is None else names)]


def matches_op(folder: OpFolder, case, ops: Sequence[str] | None) -> bool:
  """`--op` names a folder ("normalization") or a public op ("rms_norm")."""
  return not ops or folder.name in ops or case.op in ops


def quick_subset(cases: list) -> list:
  """Per public op: its audit cases (the representative set), at most two; else its first case."""
  chosen = []
  for op in dict.fromkeys(c.op for c in cases):
    mine = [c for c in cases if c.op == op]
    chosen += [c for c in mine if c.audit][:2] or mine[:1]
  return chosen


def select(folders: list[OpFolder], ops: Sequence[str] | None = None,
           case_substring: str | None = None, quick: bool = False,
           grad: bool = True) -> list[tuple[OpFolder, Any]]:
  """(folder, case) pairs that pass the filters, in catalogue order: each folder's CASES,
  then (with `grad`) its GRAD_CASES."""
  needle = (case_substring or "").lower()
  pairs = []
  for folder in folders:
    for catalogue in (folder.cases, folder.grad_cases if grad else []):
      cases = [c for c in catalogue
               if matches_op(folder, c, ops) and needle in c.label.lower()]
      pairs += [(folder, c) for c in (quick_subset(cases) if quick else cases)]
  return pairs


def case_parser(prog: str, description: str | None, *,
                quick_help: str) -> argparse.ArgumentParser:
  """A CLI parser with `select`'s filters as --op, --case and --quick (bench and autotune)."""
  p = argparse.ArgumentParser(prog=prog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--op", action="append", help="op folder or public op name (repeatable)")
  p.add_argument("--case", help="only cases whose label contains this (case-insensitive)")
  p.add_argument("--quick", action="store_true", help=quick_help)
  return p


def unknown_ops(folders: list[OpFolder], ops: Sequence[str] | None) -> list[str]:
  """Names given to `--op` that match no folder and no public op."""
  known = {f.name for f in folders} | {c.op for f in folders for c in f.cases}
  return [op for op in ops or () if op not in known]


def describe(case) -> str:
  size = f"{case.flops / 1e9:.3g} GFLOP, {case.bytes_moved / 1e6:.3g} MB"
  return f"{case.label}  ({size}{', audit' if case.audit else ''})"


def listing(folders: list[OpFolder], pairs: list[tuple[OpFolder, Any]]) -> str:
  """The `--list` text: cases by folder and public op; folders that failed to load."""
  lines = []
  for folder in folders:
    if folder.error:
      lines.append(f"ops/{folder.name}: FAILED TO LOAD: {folder.error}")
      continue
    mine = [c for f, c in pairs if f is folder]
    if not mine:
      continue
    lines.append(f"ops/{folder.name}: {len(mine)} case(s)")
    lines += [f"  {c.op:<18} {describe(c)}" for c in mine]
  if not lines:
    lines.append(f"no op folder with a specs.py under {OPS_DIR} matches")
  return "\n".join(lines)
