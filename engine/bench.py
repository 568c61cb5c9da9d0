"""`python -m engine.bench`: time to first token, decode tokens/s and throughput of the engine,
beside Hugging Face transformers `generate` on the same workload (CPU), or beside the device's
copy bandwidth (model bandwidth utilisation, every device).

  python -m engine.bench                                  # default: a few minutes on a 2-core CPU
  python -m engine.bench --hf-python .venv-hf/bin/python  # + transformers in that interpreter
  python -m engine.bench --batch-sizes 1,2,4,8,16,32 --workloads 128:128,512:64,1024:256
  python -m engine.bench --suite paged --quick            # engine v2 vs v1, CPU-sized
  python -m engine.bench --suite paged --dtype bfloat16   # the full trace (a GPU)

Suites: `fixed` (the default; the table below), `paged` (engine v2: sequences in flight and
throughput at the same KV memory as v1 static batching, prefill saved by the prefix cache; see
engine/bench_paged.py), `all`. Each suite rewrites its own part of the report and keeps the
other's.

A workload is P:N = P prompt tokens (random ids, the same for both engines), exactly N new tokens
(greedy, ignore_eos) per row, B rows in one batch. Each configuration runs once untimed, then
--repeats timed runs (median reported). Engine and transformers alternate per configuration, so
both see the same machine load. Results: bench/results/engine-<device>.json and .md (the paged
suite's under the "paged" key and the second section).

Metrics. TTFT: from the generate call to the first token of the batch on the host. Decode
tokens/s: B * (N - 1) / (last token time - first token time). Throughput: B * N / wall time.
MBU (model bandwidth utilisation): bytes a decode step must read (weights + the K/V of the
live context) / step time / the device's measured copy bandwidth (read + write of a large array).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from engine import bench_paged

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKLOADS = "128:128"
DEFAULT_BATCHES = "1,8,32"
EXTRA_WORKLOADS = "512:32@1"  # a prefill-heavy one, batch 1 only
TARGETS = {1: 1.3, 8: 1.5}  # engine / transformers decode tokens/s, SmolLM2 fp32 on CPU


@dataclasses.dataclass
class Config:
  batch: int
  prompt_len: int
  new_tokens: int

  @property
  def name(self) -> str:
    return f"B={self.batch} P={self.prompt_len} N={self.new_tokens}"


def parse_configs(batches: str, workloads: str, extra: str) -> list[Config]:
  out = []
  for w in workloads.split(","):
    p, n = (int(x) for x in w.split(":"))
    out += [Config(int(b), p, n) for b in batches.split(",")]
  for w in filter(None, extra.split(",")):
    pn, b = w.split("@")
    p, n = (int(x) for x in pn.split(":"))
    out.append(Config(int(b), p, n))
  return out


def prompts_for(config: Config, vocab_size: int, seed: int = 0) -> list[list[int]]:
  import numpy as np
  rng = np.random.default_rng([seed, config.batch, config.prompt_len])
  # Ordinary ids (past the special tokens at the start of the vocabulary).
  return rng.integers(1000, min(vocab_size, 30000), (config.batch, config.prompt_len)).tolist()


# ---------------------------------------------------------------- the engine


def run_engine(llm, config: Config, prompts) -> dict:
  from engine import SamplingParams
  params = SamplingParams(max_tokens=config.new_tokens, temperature=0, ignore_eos=True)
  start = time.perf_counter()
  outs = llm.generate(prompts, params)
  end = time.perf_counter()
  first = min(o.metrics.first_token_time for o in outs)
  last = max(o.metrics.finish_time for o in outs)
  return {"ttft_s": first - start, "decode_s": last - first, "total_s": end - start,
          "generated": [o.token_ids for o in outs]}


def summarize(config: Config, runs: list[dict]) -> dict:
  med = lambda key: statistics.median(r[key] for r in runs)
  b, n = config.batch, config.new_tokens
  decode_s = med("decode_s")
  return {"ttft_ms": med("ttft_s") * 1e3,
          "decode_tokens_per_s": b * (n - 1) / decode_s if decode_s > 0 else None,
          "step_ms": decode_s / (n - 1) * 1e3 if n > 1 else None,
          "throughput_tokens_per_s": b * n / med("total_s"),
          "runs": len(runs)}


def decode_bytes_per_step(llm, config: Config) -> int:
  """Weights + the K/V of the live context (mean over the decode) read by one decode step."""
  import jax
  from flax import nnx
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(llm.model,
                                                                             nnx.Param)))
  c = llm.model.config
  kv_dtype = llm.programs.cache_shape(1, 128).k[0].dtype
  mean_context = config.prompt_len + config.new_tokens / 2
  kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_dtype.itemsize * mean_context
  return int(weights + config.batch * kv)


def copy_bandwidth(nbytes: int = 1 << 28) -> float:
  """Bytes/s of an in-place device update of a large float32 array (read + write counted);
  donated, so no output allocation (page faults on a CPU) is timed."""
  import jax
  import jax.numpy as jnp
  step = jax.jit(lambda a: a * 0.5 + 1.0, donate_argnums=0)
  x = jax.block_until_ready(step(jnp.ones((nbytes // 4,), jnp.float32)))
  best = float("inf")
  for _ in range(10):
    t = time.perf_counter()
    x = jax.block_until_ready(step(x))
    best = min(best, time.perf_counter() - t)
  return 2 * nbytes / best


# ---------------------------------------------------------------- transformers


class HFWorker:
  """transformers in another interpreter (engine/_hf_worker.py), one JSON line per request."""

  def __init__(self, python: str, gguf: str, dtype: str):
    # OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. On a shared CPU,
    # spinning made transformers 3x slower (and the engine's runs slower too).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    self.proc = subprocess.Popen([python, str(Path(__file__).parent / "_hf_worker.py"), gguf,
                                  dtype], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, cwd=str(REPO), env=env)
    self.info = json.loads(self._read())

  def _read(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"transformers worker exited with {self.proc.wait()}")
    return line

  def run(self, config: Config, prompts) -> dict:
    self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": config.new_tokens}) + "\n")
    self.proc.stdin.flush()
    return json.loads(self._read())

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write('"quit"\n')
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def gguf_path(model: str) -> str | None:
  try:
    from models import registry
    return str(registry.resolve(model))
  except Exception:  # noqa: BLE001 - only a GGUF can be loaded by transformers here
    return None


# ---------------------------------------------------------------- driver


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  import jax
  import models
  from engine.cli import enable_compile_cache
  if args.compile_cache:
    enable_compile_cache(args.compile_cache)
  device = jax.devices()[0]
  _log(f"device: {device.device_kind} ({device.platform}); loading {args.model} ...")
  model, tokenizer = models.load(args.model, dtype=args.dtype)
  command = "python -m engine.bench " + " ".join(argv if argv is not None else sys.argv[1:])
  out = Path(args.out)
  # Each suite replaces its own part of the device's report and keeps the other's.
  result = _previous(out, device.device_kind) or {"device": device.device_kind,
                                                   "platform": device.platform}
  if args.suite in ("fixed", "all"):
    result.update(fixed_suite(model, tokenizer, args, device, command))
  if args.suite in ("paged", "all"):
    result["paged"] = paged_suite(model, tokenizer, args, device, command)
  _write(result, out)
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", default="fixed", choices=["fixed", "paged", "all"],
                      help="fixed: the batch x workload table (vs transformers with --hf-python); "
                           "paged: the engine v2 benchmarks (engine/bench_paged.py); all: both")
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch-sizes", default=DEFAULT_BATCHES)
  parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="P:N[,P:N...]")
  parser.add_argument("--extra", default=EXTRA_WORKLOADS,
                      help="P:N@B[,...]: extra single configurations ('' for none)")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration")
  parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per dispatch")
  parser.add_argument("--hf-python", help="interpreter with torch + transformers (CPU baseline)")
  paged = parser.add_argument_group("paged suite")
  paged.add_argument("--quick", action="store_true",
                     help="CPU-sized settings: shorter and fewer requests, a smaller KV budget")
  paged.add_argument("--num-requests", type=int, help="requests in the trace")
  paged.add_argument("--prefix-requests", type=int, help="requests sharing the system prompt")
  paged.add_argument("--seed", type=int, default=0, help="seed of the traces")
  parser.add_argument("--out", default=str(REPO / "bench" / "results"))
  parser.add_argument("--compile-cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                              "pallax", "jax"))
  return parser


def fixed_suite(model, tokenizer, args, device, command: str) -> dict:
  """The batch x workload table: the engine (its default, v2) on fixed batches of equal
  requests, beside transformers when --hf-python is given."""
  import jax
  from engine import LLM
  configs = parse_configs(args.batch_sizes, args.workloads, args.extra)
  max_batch = max(c.batch for c in configs)
  max_seq = 1 << (max(c.prompt_len + c.new_tokens for c in configs) - 1).bit_length()
  # No prefix cache here: every repeat sends the same prompts, and transformers computes each
  # prompt anew. With the cache on, the timed runs hit it: less prefill than transformers does,
  # and a shorter chunk program that the untimed run never compiled (TTFT then holds a compile).
  llm = LLM.from_model(model, tokenizer, max_batch_size=max_batch, max_seq_len=max_seq,
                       decode_steps=args.decode_steps, enable_prefix_caching=False)
  hf = None
  if args.hf_python:
    path = gguf_path(args.model)
    if path is None:
      _log(f"--hf-python: {args.model!r} is not a GGUF transformers can load; skipping it")
    else:
      _log(f"starting transformers in {args.hf_python} ...")
      hf = HFWorker(args.hf_python, path, args.dtype)
  copy_bw = copy_bandwidth()
  _log(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s")

  rows = []
  try:
    for config in configs:
      rows.append(_measure(llm, hf, config, args.repeats, copy_bw))
  finally:
    if hf:
      hf.close()
  return {"device": device.device_kind, "platform": device.platform, "model": args.model,
          "dtype": args.dtype, "decode_steps": args.decode_steps,
          "copy_bandwidth_gb_s": copy_bw / 1e9, "host": platform.node(),
          "cpus": os.cpu_count(), "jax": jax.__version__, "hf": hf.info if hf else None,
          "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}


def paged_settings(args) -> bench_paged.Settings:
  s = bench_paged.QUICK if args.quick else bench_paged.Settings()
  changes = {"decode_steps": args.decode_steps, "seed": args.seed}
  if args.num_requests:
    changes["num_requests"] = args.num_requests
  if args.prefix_requests:
    changes["prefix_requests"] = args.prefix_requests
  return dataclasses.replace(s, **changes)


def paged_suite(model, tokenizer, args, device, command: str) -> dict:
  """The engine v2 benchmarks (memory, prefix reuse, throughput): engine/bench_paged.py."""
  import jax
  meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__,
          "device": device.device_kind, "cpus": os.cpu_count(), "host": platform.node(),
          "model": args.model, "dtype": args.dtype, "quick": args.quick,
          "load_avg_1m_start": os.getloadavg()[0]}
  report = bench_paged.run(model, tokenizer, paged_settings(args), log=_log)
  return {**meta, **report, "load_avg_1m_end": os.getloadavg()[0]}


def _measure(llm, hf, config: Config, repeats: int, copy_bw: float) -> dict:
  _log(f"{config.name}: compiling ...")
  llm.warmup(batch_sizes=[config.batch], prompt_lens=[config.prompt_len],
             cache_lens=[config.prompt_len + config.new_tokens])
  prompts = prompts_for(config, llm.vocab_size)
  ours, theirs = [], []
  for i in range(repeats + 1):  # the first of each is untimed
    load = os.getloadavg()[0]
    run = run_engine(llm, config, prompts)
    if i:
      ours.append({**run, "load": load})
    if hf:
      run_hf = hf.run(config, prompts)
      if i:
        theirs.append(run_hf)
  row = {"batch": config.batch, "prompt_len": config.prompt_len,
         "new_tokens": config.new_tokens, "load_avg_1m": statistics.median(r["load"] for r in ours),
         "engine": summarize(config, ours)}
  step_s = row["engine"]["step_ms"] / 1e3 if row["engine"]["step_ms"] else None
  if step_s:
    row["engine"]["mbu"] = decode_bytes_per_step(llm, config) / step_s / copy_bw
  if hf:
    row["transformers"] = summarize(config, theirs)
    e, t = row["engine"]["decode_tokens_per_s"], row["transformers"]["decode_tokens_per_s"]
    row["decode_speedup"] = e / t if e and t else None
    # Greedy on both sides: rows may part ways where two logits are within rounding (fp32 sums
    # in another order), more often at larger batches.
    pairs = list(zip(ours[-1]["generated"], theirs[-1]["generated"]))
    row["same_tokens_rows"] = sum(a == b for a, b in pairs) / len(pairs)
  _log(_line(row))
  return row


def _line(row) -> str:
  e = row["engine"]
  s = (f"  engine: TTFT {e['ttft_ms']:.0f} ms, decode {e['decode_tokens_per_s']:.1f} tok/s, "
       f"throughput {e['throughput_tokens_per_s']:.1f} tok/s, MBU {e.get('mbu', 0):.0%}")
  if "transformers" in row:
    t = row["transformers"]
    s += (f"\n  transformers: TTFT {t['ttft_ms']:.0f} ms, decode {t['decode_tokens_per_s']:.1f} "
          f"tok/s, throughput {t['throughput_tokens_per_s']:.1f} tok/s; decode speedup "
          f"{row['decode_speedup']:.2f}x, rows with the same tokens: {row['same_tokens_rows']:.0%}")
  return s


def _stem(device_kind: str) -> str:
  return "engine-" + device_kind.lower().replace(" ", "-").replace("/", "-")


def _previous(out: Path, device_kind: str) -> dict | None:
  path = out / f"{_stem(device_kind)}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _write(result: dict, out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  stem = _stem(result["device"])
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / f"{stem}.md").write_text(markdown(result))
  _log(f"wrote {out / stem}.json and .md")


def markdown(result: dict) -> str:
  """The fixed suite's table (when it has run), then the paged suite's section (when it has)."""
  text = fixed_markdown(result) if "results" in result else (
      f"# Engine benchmark on {result['device']}\n\n")
  if "paged" in result:
    text += "\n" + bench_paged.markdown(result["paged"])
  return text


def fixed_markdown(result: dict) -> str:
  hf = result["hf"] is not None
  lines = [f"# Engine benchmark: {result['model']} {result['dtype']} on {result['device']}", "",
           f"`{result['command']}`, {result['date']}, jax {result['jax']}, "
           f"{result['cpus']} CPUs, decode_steps {result['decode_steps']}, measured copy "
           f"bandwidth {result['copy_bandwidth_gb_s']:.1f} GB/s"
           + (f"; transformers {result['hf']['transformers']}, torch {result['hf']['torch']}, "
              f"{result['hf']['threads']} threads" if hf else ""), ""]
  head = "| B | P | N | load | TTFT ms | decode tok/s | step ms | throughput tok/s | MBU |"
  if hf:
    head += (" HF TTFT ms | HF decode tok/s | HF throughput | decode speedup | target |"
             " same tokens |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for r in result["results"]:
    e = r["engine"]
    cells = [r["batch"], r["prompt_len"], r["new_tokens"], f"{r['load_avg_1m']:.1f}",
             f"{e['ttft_ms']:.0f}", f"{e['decode_tokens_per_s']:.1f}", f"{e['step_ms']:.1f}",
             f"{e['throughput_tokens_per_s']:.1f}", f"{e.get('mbu', 0):.0%}"]
    if hf and "transformers" not in r:  # a row measured without the transformers worker
      cells += ["–"] * 6
    elif hf:
      t = r["transformers"]
      target = TARGETS.get(r["batch"])
      verdict = ("" if target is None or r["prompt_len"] != 128 else
                 f">= {target}x: {'met' if r['decode_speedup'] >= target else 'missed'}")
      cells += [f"{t['ttft_ms']:.0f}", f"{t['decode_tokens_per_s']:.1f}",
                f"{t['throughput_tokens_per_s']:.1f}", f"{r['decode_speedup']:.2f}x", verdict,
                f"{r['same_tokens_rows']:.0%} of rows"]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  lines += ["", "load: the machine's 1-minute load average during the engine's runs (other "
            "processes share the CPUs). same tokens: rows whose greedy tokens equal transformers'.",
            ""]
  return "\n".join(lines)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
  sys.exit(main())
