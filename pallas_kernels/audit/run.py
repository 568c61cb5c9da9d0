"""Lower every audit case for each target, compile each kernel (in a small process pool), report."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax

from pallas_kernels._core import device
from pallas_kernels.audit import lowering, registry, report
from pallas_kernels.audit.compile import CompileJob, compile_kernel
from pallas_kernels.audit.targets import GpuTarget, lowering_for

_MAX_ERROR_LINES = 12


def _short(e: BaseException) -> str:
  lines = f"{type(e).__name__}: {e}".strip().splitlines()
  hidden = len(lines) - _MAX_ERROR_LINES
  more = f"\n  ... ({hidden} more lines)" if hidden > 0 else ""
  return "\n".join(lines[:_MAX_ERROR_LINES]) + more


def _check_target_seen(target: GpuTarget) -> None:
  """The kernels' heuristics must see the target we compile for (via `_core.device`)."""
  seen = device.current_target()
  want = divmod(target.compute_capability, 10)
  if seen.compute_capability != want:
    raise RuntimeError(f"_core.device.current_target() sees {seen.compute_capability} for "
                       f"{target.device_kind!r}, the audit compiles for {want}")


def lower(fn: Callable, args: tuple, kwargs: dict,
          target: GpuTarget) -> list[lowering.TritonKernel]:
  """Lower `fn(*args, **kwargs)` (abstract arrays) for CUDA on `target`; its Triton kernels."""
  with lowering_for(target):
    _check_target_seen(target)
    lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
  return lowering.triton_kernels(lowered)


def lower_case(audit_case: registry.AuditCase, target: GpuTarget) -> list[lowering.TritonKernel]:
  case = audit_case.case
  args, array_kwargs = registry.split_args(case, case.abstract_inputs())  # outside the mesh
  fn = functools.partial(audit_case.fn, **case.kwargs, impl="triton")
  return lower(fn, args, array_kwargs, target)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


class _Compiler:
  """Compiles each distinct (kernel IR, warps, stages, target) once, in a pool or inline."""

  def __init__(self, jobs: int):
    self._futures: dict[tuple, concurrent.futures.Future] = {}
    self._pool = None
    if jobs > 1:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

  def submit(self, kernel: lowering.TritonKernel, target: GpuTarget, keep_prefix: str | None):
    key = (kernel.digest, target.compute_capability)
    if key not in self._futures:
      job = CompileJob(kernel.name, kernel.ttir, target.compute_capability, kernel.num_warps,
                       kernel.num_stages, keep_prefix)
      self._futures[key] = self._run(job)
    return self._futures[key]

  def _run(self, job: CompileJob) -> concurrent.futures.Future:
    if self._pool is not None:
      return self._pool.submit(compile_kernel, job)
    future = concurrent.futures.Future()
    try:
      future.set_result(compile_kernel(job))
    except Exception as e:  # noqa: BLE001 (reported on the row)
      future.set_exception(e)
    return future

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown()


def _kernel_rows(audit_case: registry.AuditCase, target: GpuTarget, compiler: _Compiler,
                 keep: str | None) -> list[tuple[report.Row, concurrent.futures.Future | None]]:
  """Lower one case for one target; a row per kernel, with its compile on the way."""
  case = audit_case.case
  base = dict(op=case.op, case=case.label, target=target.key)
  try:
    kernels = lower_case(audit_case, target)
  except Exception as e:  # noqa: BLE001 (a row with the error; the audit fails)
    return [(report.Row(**base, kernel="-", error=f"lowering failed: {_short(e)}"), None)]
  if not kernels:
    return [(report.Row(**base, kernel="-", error="lowering produced no Triton kernel"), None)]
  out = []
  for i, k in enumerate(kernels):
    prefix = None
    if keep:
      where = Path(keep) / audit_case.folder / _slug(case.label)
      prefix = str(where / f"{i}-{k.name}.{target.key}")
    row = report.Row(**base, kernel=k.name, num_warps=k.num_warps, num_stages=k.num_stages,
                     grid=k.grid, num_dots=k.num_dots)
    out.append((row, compiler.submit(k, target, prefix)))
  return out


def _resolve(row: report.Row, future) -> report.Row:
  if future is not None:
    try:
      row.resources = future.result()
    except Exception as e:  # noqa: BLE001
      row.error = f"compile failed: {_short(e)}"
  return report.finish(row)


def audit(cases: Iterable[registry.AuditCase], targets: list[GpuTarget], *, jobs: int = 2,
          keep: str | None = None,
          progress: Callable[[str], None] | None = None) -> list[report.Row]:
  """One row per (case, target, kernel), with resources, occupancy and problems filled in."""
  progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
  compiler = _Compiler(jobs)
  pending = []
  try:
    # Case-major, so each case's targets sit side by side and the long attention compiles,
    # first in the catalogue, start first.
    for audit_case in cases:
      for target in targets:
        start = time.perf_counter()
        rows = _kernel_rows(audit_case, target, compiler, keep)
        pending += rows
        what = rows[0][0].error.splitlines()[0] if rows[0][0].error else f"{len(rows)} kernel(s)"
        progress(f"  lowered {target.key} {audit_case.case.op} | {audit_case.case.label}: "
                 f"{what} ({time.perf_counter() - start:.1f} s)")
    return [_resolve(row, future) for row, future in pending]
  finally:
    compiler.close()


