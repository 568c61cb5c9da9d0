"""Lower every audit case for each target, compile each kernel (in a small process pool), report.

Triton kernels (`impl="triton"`) are lowered, then compiled in the pool; Mosaic GPU kernels
(`impl="mosaic"`, `registry.mosaic_cases`) are lowered and their payload read in this process
while the pool compiles (`audit_all`).
"""

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
from pallas_kernels.audit import lowering, mosaic, registry, report
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


def _lowered(fn: Callable, args: tuple, kwargs: dict, target: GpuTarget):
  with lowering_for(target):
    _check_target_seen(target)
    return jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))


def lower(fn: Callable, args: tuple, kwargs: dict,
          target: GpuTarget) -> list[lowering.TritonKernel]:
  """Lower `fn(*args, **kwargs)` (abstract arrays) for CUDA on `target`; its Triton kernels."""
  return lowering.triton_kernels(_lowered(fn, args, kwargs, target))


def lower_mosaic(fn: Callable, args: tuple, kwargs: dict,
                 target: GpuTarget) -> list[mosaic.MosaicKernel]:
  """Lower `fn(*args, **kwargs)` for CUDA on `target`; its Mosaic GPU kernels, read."""
  return mosaic.mosaic_kernels(_lowered(fn, args, kwargs, target))


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


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _lower_all(cases, targets, compiler: _Compiler, keep: str | None, progress) -> list:
  pending = []
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
  return pending


def audit(cases: Iterable[registry.AuditCase], targets: list[GpuTarget], *, jobs: int = 2,
          keep: str | None = None,
          progress: Callable[[str], None] | None = None) -> list[report.Row]:
  """One row per (case, target, Triton kernel), with resources, occupancy and problems."""
  rows, _ = audit_all(cases, (), targets, jobs=jobs, keep=keep, progress=progress)
  return rows


def audit_all(cases: Iterable[registry.AuditCase], mosaic_cases: Iterable[registry.MosaicCase],
              targets: list[GpuTarget], *, jobs: int = 2, keep: str | None = None,
              progress: Callable[[str], None] | None = None,
              ) -> tuple[list[report.Row], list[report.MosaicRow]]:
  """(Triton rows, Mosaic GPU rows). The Mosaic kernels are lowered while the pool compiles."""
  progress = progress or _stderr
  compiler = _Compiler(jobs)
  try:
    pending = _lower_all(cases, targets, compiler, keep, progress)
    mosaic_rows = mosaic_audit(mosaic_cases, targets, keep=keep, progress=progress)
    return [_resolve(row, future) for row, future in pending], mosaic_rows
  finally:
    compiler.close()


# ---- Mosaic GPU ---------------------------------------------------------------------------------

def _not_applicable(mosaic_case: registry.MosaicCase, target: GpuTarget) -> str | None:
  """As `dispatch` refuses it: a Hopper-only implementation on a non-Hopper target."""
  if mosaic_case.hopper_only and target.compute_capability // 10 != 9:
    return "Hopper-only"
  return None


def lower_mosaic_case(mosaic_case: registry.MosaicCase,
                      target: GpuTarget) -> list[mosaic.MosaicKernel]:
  case = mosaic_case.case
  args, array_kwargs = registry.split_args(case, case.abstract_inputs())  # outside the mesh
  fn = functools.partial(mosaic_case.fn, **case.kwargs, impl="mosaic")
  return lower_mosaic(fn, args, array_kwargs, target)


def _keep_payload(keep: str, mosaic_case: registry.MosaicCase, i: int,
                  kernel: mosaic.MosaicKernel, target: GpuTarget) -> None:
  where = Path(keep) / mosaic_case.folder / _slug(mosaic_case.case.label)
  where.mkdir(parents=True, exist_ok=True)
  (where / f"{i}-{kernel.name}.{target.key}.mosaic.mlir").write_text(
      mosaic.payload_text(kernel.bytecode))


def _mosaic_rows(mosaic_case: registry.MosaicCase, target: GpuTarget,
                 keep: str | None) -> list[report.MosaicRow]:
  case = mosaic_case.case
  base = dict(op=case.op, case=case.label, target=target.key)
  reason = _not_applicable(mosaic_case, target)
  if reason:
    return [report.MosaicRow(**base, kernel="-", not_applicable=reason)]
  start = time.perf_counter()
  try:
    kernels = lower_mosaic_case(mosaic_case, target)
  except Exception as e:  # noqa: BLE001 (a row with the error; the audit fails)
    return [report.MosaicRow(**base, kernel="-", error=f"lowering failed: {_short(e)}")]
  lower_s = time.perf_counter() - start
  if not kernels and mosaic_case.grad:
    # The gradient may need no Mosaic kernel: a Mosaic forward whose output the backward does
    # not read (a matmul without activation) is dead code under jit, and the backward may be
    # Triton's. The forward cases still require one.
    return [report.MosaicRow(**base, kernel="-", lower_s=lower_s, not_applicable=(
        "the gradient lowers without a Mosaic kernel (forward output unused)"))]
  if not kernels:
    return [report.MosaicRow(**base, kernel="-", error=f"lowering produced no "
                             f"{mosaic.MOSAIC_CALL_TARGET} custom call (no Mosaic GPU kernel)")]
  for i, k in enumerate(kernels):
    if keep:
      _keep_payload(keep, mosaic_case, i, k, target)
  return [report.MosaicRow(**base, kernel=k.name, payload=k, lower_s=lower_s,
                           wgmma_expected=mosaic_case.wgmma_expected) for k in kernels]


def mosaic_audit(mosaic_cases: Iterable[registry.MosaicCase], targets: list[GpuTarget], *,
                 keep: str | None = None,
                 progress: Callable[[str], None] | None = None) -> list[report.MosaicRow]:
  """One row per (case, target, Mosaic GPU kernel); one "not applicable" row per case on a
  target its implementation does not support."""
  progress = progress or _stderr
  out = []
  for mosaic_case in mosaic_cases:
    for target in targets:
      start = time.perf_counter()
      rows = [report.finish_mosaic(row) for row in _mosaic_rows(mosaic_case, target, keep)]
      out += rows
      first = rows[0]
      what = (first.status if first.not_applicable else
              first.error.splitlines()[0] if first.error else f"{len(rows)} Mosaic kernel(s)")
      progress(f"  lowered {target.key} {mosaic_case.case.op} [mosaic] | "
               f"{mosaic_case.case.label}: {what} ({time.perf_counter() - start:.1f} s)")
  return out


