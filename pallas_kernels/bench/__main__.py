"""CLI of the benchmark suite; see the package docstring and bench/README.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from pallas_kernels._core.device import on_gpu
from pallas_kernels.bench import __doc__ as package_doc
from pallas_kernels.bench import registry, report, roofline, runner, timing

NO_GPU = ("pallas_kernels.bench: no GPU here (jax's first device is {platform} {kind!r}), so "
          "nothing is timed: timings of interpret mode or CPU XLA say nothing about GPU kernels. "
          "Run this on an NVIDIA GPU. The cases it would run:")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = registry.case_parser(
      "python -m pallas_kernels.bench", package_doc,
      quick_help="per public op, its audit cases (at most two), else its first case")
  p.add_argument("--list", action="store_true", help="list the selected cases and exit")
  p.add_argument("--timer", choices=timing.TIMER_NAMES, default="auto",
                 help="cupti (kernel device time, default where available) or wallclock")
  p.add_argument("--reps", type=int, help="calls per timing (cupti; default from a time budget)")
  p.add_argument("--rtol", type=float, help="correctness gate, overriding the per-dtype table")
  p.add_argument("--no-rotate", action="store_true",
                 help="time every call on one input set (L2-warm for small cases)")
  p.add_argument("--out", help="results folder (default bench/results/<date>-<device-slug>)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  folders = registry.load()
  unknown = registry.unknown_ops(folders, args.op)
  if unknown:
    print(f"pallas_kernels.bench: --op {unknown} matches no op folder or public op; "
          f"known folders: {[f.name for f in folders]}", file=sys.stderr)
    return 2
  pairs = registry.select(folders, args.op, args.case, args.quick)
  load_failed = any(f.error for f in folders)
  if args.list or not on_gpu():
    if not args.list:
      device = jax.devices()[0]
      print(NO_GPU.format(platform=device.platform, kind=device.device_kind))
    print(registry.listing(folders, pairs))
    return 1 if load_failed else 0
  return run(args, folders, pairs, argv if argv is not None else sys.argv[1:])


def run(args, folders, pairs, argv) -> int:
  timer = timing.make_timer(args.timer, reps=args.reps)
  meta = report.run_meta(timer.name, argv)
  print(f"{meta['device_kind']}, jax {meta['jax']}, timer {timer.name}, {len(pairs)} case(s)")
  roof = roofline.measure(timer)
  print(f"roofline: {roof.peak_tflops:.0f} TFLOP/s, {roof.peak_gbps:.0f} GB/s, timer floor "
        f"{roof.floor_ms * 1e3:.1f} us, dispatch floor {(roof.dispatch_ms or 0) * 1e3:.1f} us")
  rotate = 0 if args.no_rotate else timing.ROTATE_BYTES
  out_dir = args.out or report.results_dir(meta)
  stem = report.file_stem(args.op, args.case, args.quick)
  rows = []
  for folder, case in pairs:
    print(f"{case.op}: {case.label}", flush=True)
    try:
      rows += runner.run_case(folder, case, timer, roof, rtol=args.rtol, rotate_bytes=rotate,
                              log=lambda line: print(line, flush=True))
    except Exception as exc:  # inputs or the op itself unusable: the case fails, the run goes on
      rows.append(runner.Row(case.op, case.label, "(case)", "ours",
                             error=registry.short_error(exc)))
    report.write_all(out_dir, stem, meta, roof, rows, plot=False)  # a killed run keeps its rows
  paths = report.write_all(out_dir, stem, meta, roof, rows)
  print(report.markdown(meta, roof, rows))
  print("wrote " + ", ".join(str(p) for p in paths))
  bad = [r for r in rows if r.kind == "ours" and r.status in (runner.WRONG, runner.ERROR)]
  for r in bad:
    print(f"FAILED: {r.impl} on {r.case}: {r.status} {r.error or f'rel err {r.rel_err:.2e}'}",
          file=sys.stderr)
  failed_loads = [f for f in folders if f.error]
  for f in failed_loads:
    print(f"FAILED TO LOAD ops/{f.name}: {f.error}", file=sys.stderr)
  return 1 if bad or failed_loads else 0


if __name__ == "__main__":
  sys.exit(main())
