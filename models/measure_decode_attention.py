"""Time the "xla" decode_attention (the engine's CPU attention), alone and in a model's decode
step, against a baseline version of `reference.py` in the same process.

    git show HEAD:pallas_kernels/ops/decode_attention/reference.py > /tmp/ref_before.py
    .venv/bin/python -m models.measure_decode_attention --baseline /tmp/ref_before.py \
        [--batch 1 8] [--max-len 512 2048] [--reps 40] [--model smollm2-135m] [--steps 20]

Attention alone: SmolLM2-135M's shapes (9 heads, 3 KV heads, head_dim 64, fp32), caches about
half full (lengths max_len / 2 +- 8); baseline and current alternate call by call, so both see
the same machine load; median ms per call. `--model` then times the model's whole decode step
with each version (see `time_model`), steps alternating between versions.
Alone, the same caches are read call after call and at small sizes sit in the CPU's L3 cache,
unlike a model's 30 layers of caches: the whole-step numbers are the ones that count.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ops.decode_attention import reference


def load_baseline(path: str):
  spec = importlib.util.spec_from_file_location("decode_attention_baseline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.decode_attention


def time_alone(fns: dict, batch: int, max_len: int, reps: int, heads=(9, 3), head_dim=64):
  rng = np.random.default_rng(0)
  num_heads, num_kv_heads = heads
  q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim), np.float32))
  cache = (batch, max_len, num_kv_heads, head_dim)
  k = jnp.asarray(rng.standard_normal(cache, np.float32))
  v = jnp.asarray(rng.standard_normal(cache, np.float32))
  lengths = jnp.asarray(rng.integers(max_len // 2 - 8, max_len // 2 + 8, batch), jnp.int32)
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  outs = [np.asarray(f(q, k, v, lengths)) for f in jitted.values()]  # compile, and agree
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-5)
  times = {name: [] for name in fns}
  for _ in range(reps):  # alternating
    for name, f in jitted.items():
      t0 = time.perf_counter()
      f(q, k, v, lengths).block_until_ready()
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def time_model(fns: dict, model_name: str, batch: int, max_len: int, steps: int):
  """Median ms of one jitted decode step (cache donated, as the engine runs it) per version of
  the reference, each compiled ahead of time with it swapped in; steps alternate between the
  versions. The caches hold random values, rows max_len / 2 long (reset every step)."""
  import models
  from flax import nnx
  model, _ = models.load(model_name, dtype="float32", impl="xla")
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = jnp.zeros((batch,), jnp.int32)

  def random_cache():
    cache = model.init_cache(batch, max_len)
    fill = lambda bufs: tuple(jnp.asarray(rng.standard_normal(b.shape, np.float32)) for b in bufs)
    return dataclasses.replace(cache, k=fill(cache.k), v=fill(cache.v))

  current = reference.decode_attention
  steps_fns, caches = {}, {}
  for name, fn in fns.items():
    reference.decode_attention = fn  # looked up when the "xla" impl is traced
    jax.clear_caches()               # else the first version's trace is reused
    caches[name] = random_cache()
    steps_fns[name] = jax.jit(models.decode_step, static_argnums=0, donate_argnums=3).lower(
        graphdef, state, tokens, caches[name]).compile()
  reference.decode_attention = current
  times = {name: [] for name in fns}
  for step in range(steps + 2):  # 2 warm-up steps
    for name, decode in steps_fns.items():
      lengths = jnp.full((batch,), max_len // 2, jnp.int32)  # fresh: donated with the cache
      cache = dataclasses.replace(caches[name], lengths=lengths)
      t0 = time.perf_counter()
      logits, caches[name] = decode(state, tokens, cache)
      logits.block_until_ready()
      if step >= 2:
        times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", help="a file defining decode_attention (the old reference)")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--max-len", type=int, nargs="+", default=[512, 2048])
  parser.add_argument("--reps", type=int, default=40)
  parser.add_argument("--model", help="also time whole decode steps of this model")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  fns = {"current": reference.decode_attention}
  if args.baseline:
    fns = {"baseline": load_baseline(args.baseline), **fns}
  for max_len in args.max_len:
    for batch in args.batch:
      ms = time_alone(fns, batch, max_len, args.reps)
      print(f"attention alone b{batch} max_len {max_len}: "
            + "  ".join(f"{n} {t:.3f} ms" for n, t in ms.items())
            + f" | load average {os.getloadavg()[0]:.1f}", flush=True)
  if args.model:
    for max_len in args.max_len:
      for batch in args.batch:
        ms = time_model(fns, args.model, batch, max_len, args.steps)
        print(f"{args.model} decode step b{batch} max_len {max_len}: "
              + "  ".join(f"{n} {t:.1f} ms" for n, t in ms.items())
              + f" | load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
  main()
