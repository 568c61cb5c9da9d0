"""Results of a run: JSON (everything), Markdown (the table), PNG (roofline fractions).

All three go to `bench/results/<date>-<device-slug>/`, named after the filters of the run
(`bench.json`, `bench-attention-quick.json`, ...) so runs of one day do not overwrite
each other unless they repeat the same selection.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import jax

from pallas_kernels._core import config as config_lib
from pallas_kernels.bench.roofline import Roofline

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def git_commit(root: Path = REPO_ROOT) -> str:
  """$PALLAX_GIT_COMMIT (for copies without .git, e.g. a lent GPU machine), else HEAD with
  "+dirty" for uncommitted changes; "unknown" outside a git checkout."""
  if os.environ.get("PALLAX_GIT_COMMIT"):
    return os.environ["PALLAX_GIT_COMMIT"]
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def run_meta(timer_method: str, argv: Sequence[str]) -> dict:
  device = jax.devices()[0]
  now = datetime.datetime.now(datetime.timezone.utc)
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "date": now.date().isoformat(),
      "time_utc": now.isoformat(timespec="seconds"),
      "git_commit": git_commit(),
      "jax": jax.__version__,
      "jaxlib": importlib.metadata.version("jaxlib"),
      "python": platform.python_version(),
      "timer": timer_method,
      "argv": list(argv),
  }


def results_dir(meta: dict, base: Path = RESULTS_DIR) -> Path:
  return Path(base) / f"{meta['date']}-{config_lib.device_slug(meta['device_kind'])}"


def file_stem(ops: Sequence[str] | None, case: str | None, quick: bool) -> str:
  parts = ["bench", *(ops or ())]
  if case:
    parts.append("case-" + re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-"))
  if quick:
    parts.append("quick")
  return "-".join(parts)


def _num(x, fmt: str, scale: float = 1.0) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  return format(x * scale, fmt)


HEADER = ("| case | impl | status | time (ms) | TFLOP/s | GB/s | roofline | bound "
          "| vs best peer | rel err |")


def markdown(meta: dict, roof: Roofline | None, rows: Sequence) -> str:
  lines = [f"# Pallax kernels on {meta['device_kind']}", "",
           f"{meta['time_utc']}, commit `{meta['git_commit']}`, jax {meta['jax']}, "
           f"timer {meta['timer']}.", ""]
  if roof is not None:
    lines += [f"Measured roofline: {roof.peak_tflops:.0f} TFLOP/s (bf16 8192³ jnp.dot), "
              f"{roof.peak_gbps:.0f} GB/s (copy, read + write); "
              f"timer floor (empty kernel) {roof.floor_ms * 1e3:.1f} µs, "
              f"dispatch floor (host, per jitted call) {_num(roof.dispatch_ms, '.1f', 1e3)} µs.",
              ""]
  for op in dict.fromkeys(r.op for r in rows):
    lines += [f"## {op}", "", HEADER, "|" + "---|" * 10]
    for r in (r for r in rows if r.op == op):
      status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[0][:80]}"
      lines.append("| " + " | ".join([
          r.case, f"**{r.impl}**" if r.kind == "ours" else r.impl, status.replace("|", "/"),
          _num(r.ms, ".4f"), _num(r.tflops, ".1f"), _num(r.gbps, ".0f"),
          _num(r.roofline_fraction, ".1f", 100) + ("%" if r.roofline_fraction else ""),
          r.bound or "–", _num(r.vs_best_peer, ".2f") + ("×" if r.vs_best_peer else ""),
          _num(r.rel_err, ".1e")]) + " |")
    lines.append("")
  lines += ["time: median device time of one call. roofline: max(flops / peak, bytes / bandwidth) "
            "over the time, against the ceilings measured above. vs best peer: the fastest "
            "correct peer's time over this row's time (> 1: faster than every peer). "
            "rel err: ‖out − xla‖ / ‖xla‖; rows over the gate are `wrong`, never best.",
            ""]
  return "\n".join(lines)


def write_plot(path: Path, rows: Sequence) -> Path | None:
  """Horizontal bars of roofline fraction per case, one panel per op, one bar per impl."""
  timed = [r for r in rows if r.roofline_fraction is not None]
  if not timed:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ops = list(dict.fromkeys(r.op for r in timed))
  cases = {op: list(dict.fromkeys(r.case for r in timed if r.op == op)) for op in ops}
  impls = list(dict.fromkeys(r.impl for r in timed))
  heights = [max(1.5, 0.35 * len(cases[op]) * max(1, len(impls)) ** 0.5 + 1) for op in ops]
  fig, axes = plt.subplots(len(ops), 1, figsize=(10, sum(heights)), squeeze=False,
                           gridspec_kw={"height_ratios": heights})
  bar = 0.8 / len(impls)
  for ax, op in zip(axes[:, 0], ops):
    for i, impl in enumerate(impls):
      ys, xs = [], []
      for y, case in enumerate(cases[op]):
        for r in timed:
          if (r.op, r.case, r.impl) == (op, case, impl):
            ys.append(y + i * bar)
            xs.append(100 * r.roofline_fraction)
      if xs:
        ax.barh(ys, xs, height=bar, label=impl, hatch="//" if impl.startswith("pallax") else None)
    ax.set_yticks([y + 0.4 - bar / 2 for y in range(len(cases[op]))], cases[op], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of measured roofline")
    ax.set_title(op)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _jsonable(x):
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def write_all(out_dir: Path, stem: str, meta: dict, roof: Roofline | None,
              rows: Sequence, plot: bool = True) -> list[Path]:
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  payload = {"meta": meta, "roofline": dataclasses.asdict(roof) if roof else None,
             "rows": [{k: _jsonable(v) for k, v in dataclasses.asdict(r).items()} for r in rows]}
  json_path = out_dir / f"{stem}.json"
  json_path.write_text(json.dumps(payload, indent=1) + "\n")
  md_path = out_dir / f"{stem}.md"
  md_path.write_text(markdown(meta, roof, rows))
  png = write_plot(out_dir / f"{stem}.png", rows) if plot else None
  return [json_path, md_path] + ([png] if png else [])
