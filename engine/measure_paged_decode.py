"""Whole-pool copies in engine v2's compiled programs, and its decode tokens/s, against a baseline
version of `models/paged_cache.py` in the same process.

    git show HEAD:models/paged_cache.py > /tmp/paged_cache_before.py
    .venv/bin/python -m engine.measure_paged_decode [--baseline /tmp/paged_cache_before.py] \
        [--model smollm2-135m] [--batch 1 8] [--prompt 32] [--new-tokens 64] [--rounds 3]

Copies: the compiled decode program of each batch size (and one prefill chunk) is read with
`pool_copies`, the number of `copy` instructions that move as many elements as a whole layer pool
(in any shape: a flat [num_pages * page_size, ...] view counts too). The pool is donated, so
every such copy is overhead: the count should be 0.
Speed: the default pool (max_batch_size x max_seq_len tokens, 1025 pages of 16 for 8 x 2048),
greedy, `ignore_eos`, prefix caching off (a repeated prompt would hit the cache and run a prefill
shape the warm-up did not compile). Decode tokens/s = tokens after each row's first / time from
the last first token to the last finish. With `--baseline`, a second engine over the same model
traces its programs with the baseline's `write`/`slots`, and the two alternate round by round so
both see the same machine load; medians are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import statistics
import sys

import jax
import numpy as np

_INSTRUCTION = re.compile(r"= \w+\[([0-9,]*)\]\{[^}]*\} (copy|copy-start)\(")


def pool_copies(hlo_text: str, pool_shape: tuple[int, ...]) -> int:
  """How many copy instructions in compiled HLO text move as many elements as one pool."""
  size = int(np.prod(pool_shape))
  return sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1])) == size
             for dims, _ in _INSTRUCTION.findall(hlo_text))


def load_baseline(path: str):
  spec = importlib.util.spec_from_file_location("paged_cache_baseline", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass looks its module up
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def patched(module):
  """models.paged_cache.write/slots replaced by `module`'s while tracing (None: unchanged)."""
  from models import paged_cache
  if module is None:
    yield
    return
  saved = paged_cache.write, paged_cache.slots
  paged_cache.write, paged_cache.slots = module.write, module.slots
  try:
    yield
  finally:
    paged_cache.write, paged_cache.slots = saved


def decode_rate(outputs) -> float:
  """Tokens after each request's first / time from the last first token to the last finish."""
  start = max(o.metrics.first_token_time for o in outputs)
  end = max(o.metrics.finish_time for o in outputs)
  return sum(len(o.token_ids) - 1 for o in outputs) / (end - start)


def copies(llm, batch_sizes, prompt: int, new_tokens: int) -> dict:
  """Pool copies of the decode programs the timed runs use, and of one prefill chunk."""
  programs = llm.paged_programs
  pool_shape = tuple(jax.eval_shape(programs.init_cache).k[0].shape)
  pages = llm.paged_buckets.decode_shape(1, -(-(prompt + new_tokens) // llm.page_size))[1]
  out = {}
  for b in batch_sizes:
    shape = llm.paged_buckets.decode_shape(b, pages)
    out[("paged_decode", shape)] = pool_copies(programs.get("paged_decode", shape).as_text(),
                                               pool_shape)
  shape = llm.paged_buckets.prefill_shape(max(batch_sizes), prompt, pages)
  out[("paged_prefill", shape)] = pool_copies(programs.get("paged_prefill", shape).as_text(),
                                              pool_shape)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--baseline", help="a models/paged_cache.py to compare against")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  import models
  from engine import LLM, SamplingParams

  model, tokenizer = models.load(args.model)
  variants = {"current": None}
  if args.baseline:
    variants = {"baseline": load_baseline(args.baseline), **variants}
  engines = {name: LLM.from_model(model, tokenizer, max_batch_size=max(8, *args.batch),
                                  enable_prefix_caching=False) for name in variants}
  params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
  rng = np.random.default_rng(0)
  prompts = {b: [rng.integers(100, 1000, args.prompt).tolist() for _ in range(b)]
             for b in args.batch}
  tokens = {}
  for name, llm in engines.items():
    with patched(variants[name]):
      print(f"{name}: pool copies per compiled program "
            f"{copies(llm, args.batch, args.prompt, args.new_tokens)}", flush=True)
      for b in args.batch:  # warm-up: compiles every program the timed runs use
        tokens[name, b] = [o.token_ids for o in llm.generate(prompts[b], params)]
  if args.baseline:
    same = all(tokens["baseline", b] == tokens["current", b] for b in args.batch)
    print(f"greedy tokens equal to the baseline's: {same}")
  rates = {(name, b): [] for name in engines for b in args.batch}
  for _ in range(args.rounds):
    for b in args.batch:
      for name, llm in engines.items():
        with patched(variants[name]):
          rates[name, b].append(decode_rate(llm.generate(prompts[b], params)))
  print(f"load average {os.getloadavg()[0]:.1f}")
  for b in args.batch:
    for name in engines:
      r = rates[name, b]
      print(f"batch {b} {name:8s} decode {statistics.median(r):6.1f} tok/s (median of "
            f"{len(r)}: {', '.join(f'{x:.1f}' for x in r)})")


if __name__ == "__main__":
  main()
