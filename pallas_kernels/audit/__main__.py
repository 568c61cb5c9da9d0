"""`python -m pallas_kernels.audit [--op NAME] [--target sm80|sm90] [--json PATH] [--keep DIR]`."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
  from pallas_kernels.audit.targets import TARGETS
  p = argparse.ArgumentParser(
      prog="python -m pallas_kernels.audit",
      description="Offline GPU audit: lower every op's audit cases for CUDA (A100 sm_80, H100 "
                  "sm_90) on this machine, compile each Triton kernel, report registers, spills, "
                  "shared memory, occupancy and tensor-core use; lower the cases of ops with an "
                  "impl='mosaic' for sm_90 and report each Mosaic GPU kernel's shared memory, "
                  "wgmma, TMA and mbarrier use. Exit status 1 when a kernel spills, exceeds "
                  "shared memory, misses tensor cores on a tt.dot (Triton) or has no wgmma "
                  "(Mosaic attention/matmul), or a case fails to lower or compile.")
  p.add_argument("--op", help="only this op (Case.op, e.g. rms_norm) or op folder (normalization)")
  p.add_argument("--target", choices=sorted(TARGETS), action="append",
                 help="only this target (repeatable); default: all")
  p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  p.add_argument("--keep", metavar="DIR",
                 help="keep .ttir/.ttgir/.ptx/.cubin of every Triton kernel and the payload "
                      "(.mosaic.mlir) of every Mosaic GPU kernel")
  p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                 help="compile processes (default: %(default)s)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  from pallas_kernels.audit import compile as compile_lib
  from pallas_kernels.audit import registry, report, run
  from pallas_kernels.audit.targets import TARGETS

  notes, errors = [], []
  cases = registry.audit_cases(args.op, notes, errors)
  mosaic_cases = registry.mosaic_cases(cases, notes, errors)
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  if not cases and not mosaic_cases and not errors:
    known = ", ".join(registry.OP_FOLDERS)
    print(f"audit: no audit=True case{f' for --op {args.op}' if args.op else ''} "
          f"(ops: {known})", file=sys.stderr)
    return 1
  targets = [TARGETS[t] for t in (args.target or sorted(TARGETS))]
  rows, mosaic_rows = run.audit_all(cases, mosaic_cases, targets, jobs=args.jobs,
                                    keep=args.keep)
  wall_s = time.perf_counter() - start

  print(report.table(rows))
  print()
  print(report.footer(compile_lib.toolchain()))
  if mosaic_rows:
    print()
    print(report.mosaic_table(mosaic_rows))
    print()
    print(report.mosaic_footer())
  print(f"{len(rows)} kernel rows from {len(cases)} cases x {len(targets)} targets "
        f"in {wall_s:.0f} s.")
  if mosaic_cases:
    lower_s = {(r.case, r.target): r.lower_s for r in mosaic_rows if r.lower_s is not None}
    print(f"{len(mosaic_rows)} Mosaic GPU rows from {len(mosaic_cases)} cases, "
          f"{len(lower_s)} lowered in {sum(lower_s.values()):.0f} s.")
  for line in notes:
    print(f"note: {line}")
  for line in errors:
    print(f"error: {line}", file=sys.stderr)
  for line in report.failures(rows) + report.failures(mosaic_rows):
    print(f"FAIL {line}", file=sys.stderr)
  if args.json:
    report.write_json(args.json, rows, {"targets": [t.key for t in targets], "wall_s": wall_s,
                                        "toolchain": compile_lib.toolchain(), "notes": notes,
                                        "errors": errors}, mosaic_rows)
  bad = report.failed(rows) or report.failed(mosaic_rows) or bool(errors)
  print("audit: FAILED" if bad else "audit: passed", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
