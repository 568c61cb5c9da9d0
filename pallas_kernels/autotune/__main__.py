"""CLI of the autotuner; see the package docstring."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device
from pallas_kernels._core.device import on_gpu
from pallas_kernels.autotune import __doc__ as package_doc
from pallas_kernels.autotune import adapters, candidates, tuner
from pallas_kernels.bench import registry, report, timing
from pallas_kernels.bench.registry import short_error

# The target `--list` enumerates candidates for when there is no GPU here.
ASSUMED_TARGET = device.Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024, 132)
# --pass: which kernels' configs to tune (backward: the `bwd_config` of ops that take one).
PASSES = {"forward": (False,), "backward": (True,), "both": (False, True)}
NO_GPU = ("pallas_kernels.autotune: a GPU is required to tune (jax's first device is {platform} "
          "{kind!r}): configs are chosen by their time on the card, and interpret mode or CPU "
          "XLA has none. Run this on an NVIDIA GPU; `--list` shows what it would tune.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = registry.case_parser("python -m pallas_kernels.autotune", package_doc,
                           quick_help="the benchmark's --quick subset of cases")
  p.add_argument("--list", action="store_true",
                 help="list tuning keys, their cases and candidate counts, and exit")
  p.add_argument("--pass", dest="tune_pass", choices=tuple(PASSES), default="both",
                 help="forward: configs from CASES; backward: bwd_configs from GRAD_CASES, "
                      "timed as forward + vjp; both (default): forward keys, then backward")
  p.add_argument("--max-candidates", type=int, default=candidates.DEFAULT_LIMIT,
                 help="configs tried per key, the default config first")
  p.add_argument("--cases-per-key", type=int, default=tuner.DEFAULT_CASES_PER_KEY,
                 help="cases timed per key, spread by size (smallest and largest first)")
  p.add_argument("--timer", choices=timing.TIMER_NAMES, default="auto",
                 help="cupti (kernel device time, default where available) or wallclock")
  p.add_argument("--budget-ms", type=float, default=100.0, help="timing budget per config and case")
  p.add_argument("--rtol", type=float, help="correctness gate, overriding the per-dtype table")
  p.add_argument("--no-write", action="store_true", help="time and report, leave tables alone")
  p.add_argument("--out", help="folder of the trial logs "
                               "(default bench/results/<date>-<device-slug>)")
  return p.parse_args(argv)


def plan(folders, args) -> list[tuple]:
  """(adapter or NotTunable error, folder, name, [(key, cases)]) for every selected public op
  and pass: per folder its ops' forward keys (CASES), then their backward keys (GRAD_CASES);
  `name` is the op's, "<op> backward" for the backward."""
  passes = PASSES[args.tune_pass]
  pairs = registry.select(folders, args.op, args.case, args.quick, grad=True in passes)
  out = []
  for folder in folders:
    for backward in passes:
      cases = [c for f, c in pairs if f is folder and folder.is_grad_case(c) == backward]
      for op in dict.fromkeys(c.op for c in cases):
        name = f"{op} backward" if backward else op
        try:
          adapter = adapters.adapter_for(folder, op, backward=backward)
          groups = tuner.group_by_key(adapter, cases, args.cases_per_key)
          out.append((adapter, folder, name, groups))
        except Exception as exc:
          out.append((exc, folder, name, []))
  return out


def listing(planned, target, limit: int) -> str:
  lines = [f"candidates counted for {target.device_kind}"]
  for adapter, folder, op, groups in planned:
    if isinstance(adapter, adapters.NoBackwardConfig):
      lines.append(f"ops/{folder.name} {op}: not tuned: {adapter}")
      continue
    if isinstance(adapter, Exception):
      lines.append(f"ops/{folder.name} {op}: NOT TUNABLE: {short_error(adapter)}")
      continue
    hook = "bwd_candidates()" if adapter.backward else "candidates()"
    source = hook if adapter.candidates else "generic grid"
    lines.append(f"ops/{folder.name} {op}: {len(groups)} key(s), "
                 f"config {adapter.config_cls.__name__}, candidates from {source}")
    for key, cases in groups:
      args, kwargs = folder.bind(cases[0], cases[0].abstract_inputs())
      try:
        count = str(len(candidates.enumerate_configs(adapter, target, args, kwargs, limit)))
      except Exception as exc:
        count = f"ERROR {short_error(exc)}"
      lines.append(f"  {json.dumps(tuner.jsonable_key(key))}: {count} candidates over "
                   f"{len(cases)} case(s): {'; '.join(c.label for c in cases)}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  folders = registry.load()
  unknown = registry.unknown_ops(folders, args.op)
  if unknown:
    print(f"pallas_kernels.autotune: --op {unknown} matches no op folder or public op",
          file=sys.stderr)
    return 2
  if args.list:
    target = device.current_target() if on_gpu() else ASSUMED_TARGET
    print(listing(plan(folders, args), target, args.max_candidates))
    return 1 if any(f.error for f in folders) else 0
  if not on_gpu():
    first = jax.devices()[0]
    print(NO_GPU.format(platform=first.platform, kind=first.device_kind), file=sys.stderr)
    return 2
  return tune(args, folders, argv if argv is not None else sys.argv[1:])


def tune(args, folders, argv) -> int:
  target = device.current_target()
  timer = timing.make_timer(args.timer, budget_ms=args.budget_ms)
  meta = report.run_meta(timer.name, argv)
  log_dir = Path(args.out) if args.out else report.results_dir(meta)
  failures = 0
  for adapter, folder, op, groups in plan(folders, args):
    if isinstance(adapter, Exception):
      print(f"ops/{folder.name} {op}: skipped, not tunable: {short_error(adapter)}")
      continue
    results = []
    log_path = log_dir / f"autotune-{folder.name}-{op.replace(' ', '-')}.json"
    for key, cases in groups:
      print(f"{op} {json.dumps(tuner.jsonable_key(key))} ({len(cases)} case(s))", flush=True)
      try:
        result = tuner.tune_key(adapter, key, cases, target, timer, limit=args.max_candidates,
                                rtol=args.rtol, log=lambda line: print(line, flush=True))
      except Exception as exc:  # reference or inputs failed: this key only
        result = tuner.error_result(adapter, key, cases, exc)
      results.append(result)
      print("  " + summary(result), flush=True)
      failures += result.winner is None
      # After every key, so that a run stopped at a time limit keeps what it finished.
      log_dir.mkdir(parents=True, exist_ok=True)
      log_path.write_text(json.dumps({"meta": meta, "keys": [tuner.log_record(r) for r in results]},
                                     indent=1) + "\n")
      if not args.no_write and result.winner is not None:
        tuner.write_winners(folder.path, folder.name, target.device_kind, [result])
    print(f"log: {log_path}")
    if not args.no_write:
      print(f"table: {config_lib.tuned_path(folder.path, target.device_kind)}")
  return 1 if failures else 0


def summary(result: tuner.KeyResult) -> str:
  if result.winner is None:
    return f"no config passed ({result.current.error or 'see trials'})"
  won, now = result.winner.score_ms, result.current.score_ms
  versus = f", {now / won:.2f}x vs config=None ({now:.4f} ms)" if now < float("inf") else ""
  return f"winner {result.winner.config}: {won:.4f} ms{versus}"


if __name__ == "__main__":
  sys.exit(main())
