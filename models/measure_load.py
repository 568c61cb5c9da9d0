"""Load time and peak memory of `models.load`, each source in a fresh interpreter.

    .venv/bin/python -m models.measure_load [--dtype float32] [--formats] [SOURCE ...]

SOURCE is anything `models.load` takes (default: smollm2-135m, the embedded GGUF). For each, a
child process imports everything first (the interpreter baseline: python + jax + flax + models),
then times `models.load` (model and tokenizer) and reads the peak RSS (`ru_maxrss`, which
includes the pages of the memory-mapped file that were read). The target is
peak - baseline <= 1.5 x the model's parameter bytes.

--formats also writes the first SOURCE, loaded in --dtype, to a temporary directory as a Hugging
Face safetensors directory (`models.export_safetensors`) and as our Orbax checkpoint
(`models.save`), in a separate child, and measures loading each of those the same way.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20
TARGET_RATIO = 1.5


def _rss_now() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def _child(source: str, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp

  import models
  from models.llama import param_bytes

  jnp.zeros(1).block_until_ready()  # the backend is started before the baseline
  baseline = _rss_now()
  start = time.perf_counter()
  model, tokenizer = models.load(source, dtype=dtype)
  jax.block_until_ready(jax.tree.leaves(model))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"source": source, "dtype": dtype, "load_s": seconds, "baseline": baseline,
          "peak": peak, "final": _rss_now(), "params": param_bytes(model),
          "vocab": tokenizer.vocab_size}


def _export_child(source: str, dtype: str, directory: str) -> dict:
  import models

  model, tokenizer = models.load(source, dtype=dtype)
  out = Path(directory)
  models.export_safetensors(model, tokenizer, out / "safetensors")
  models.save(model, tokenizer, out / "orbax")
  return {str(out / "safetensors"): f"{source} safetensors", str(out / "orbax"): f"{source} orbax"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("sources", nargs="*", default=["smollm2-135m"])
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--formats", action="store_true",
                      help="also measure the first source exported to safetensors and to Orbax")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--export-to", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args.sources[0], args.dtype)))
    return
  if args.export_to:
    print(json.dumps(_export_child(args.sources[0], args.dtype, args.export_to)))
    return
  labels = {source: source for source in args.sources}
  scratch = tempfile.mkdtemp(prefix="measure_load_") if args.formats else None
  try:
    if scratch:
      out = subprocess.run([sys.executable, "-m", "models.measure_load", "--export-to", scratch,
                            "--dtype", args.dtype, args.sources[0]], capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(f"export of {args.sources[0]} failed:\n{out.stderr[-2000:]}")
      labels |= json.loads(out.stdout.strip().splitlines()[-1])
    _measure(labels, args.dtype)
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)


def _measure(labels: dict[str, str], dtype: str):
  print(f"{'source':<28} {'dtype':<9} {'load s':>7} {'base MB':>8} {'peak MB':>8} "
        f"{'final MB':>9} {'params MB':>10} {'(peak-base)/params':>19}")
  for source, label in labels.items():
    out = subprocess.run([sys.executable, "-m", "models.measure_load", "--child",
                          "--dtype", dtype, source], capture_output=True, text=True)
    if out.returncode:
      print(f"{label:<28} failed:\n{out.stderr[-2000:]}")
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (r["peak"] - r["baseline"]) / r["params"]
    verdict = "ok" if ratio <= TARGET_RATIO else f"over {TARGET_RATIO}"
    print(f"{label:<28} {r['dtype']:<9} {r['load_s']:>7.2f} {r['baseline'] / MB:>8.0f} "
          f"{r['peak'] / MB:>8.0f} {r['final'] / MB:>9.0f} {r['params'] / MB:>10.0f} "
          f"{ratio:>15.2f} {verdict}")


if __name__ == "__main__":
  main()
