"""Time one jitted decode step of a model, as the engine runs it (cache donated, graphdef static).

    .venv/bin/python -m models.measure_decode [--model smollm2-135m] [--batch 1 8] [--prompt 128]
        [--steps 64] [--max-seq-len 256] [--dtype float32] [--impl xla]

Prefills `--prompt` random tokens per row, then times `--steps` decode steps (each waited for);
prints the median and best ms/step and tokens/s, beside a "weights-only floor" timed in the same
loop: only the model's weight contractions as plain XLA dots, i.e. what streaming the weights
through XLA's matrix-vector products costs on this machine right now. The machine's load average
is printed too: on a shared CPU the numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import models


def weights_floor(model, batch: int):
  """A jitted function doing only the model's weight contractions (every 2-D parameter against
  a [batch, K] input, plain XLA dots): what XLA's matrix-vector throughput alone costs."""
  weights = [w for w in jax.tree.leaves(nnx.state(model, nnx.Param)) if w.ndim == 2]
  widest = max(max(w.shape) for w in weights)
  x = jnp.full((batch, widest), 0.01, model.dtype)

  @jax.jit
  def floor(weights, x):
    total = jnp.zeros((), jnp.float32)
    for w in weights:
      if w.shape[0] == model.config.vocab_size:  # the [vocab, hidden] embedding, as the head
        y = jax.lax.dot_general(w, x[:, :w.shape[1]], (((1,), (1,)), ((), ())))
      else:
        y = x[:, :w.shape[0]] @ w
      total += y[0, 0].astype(jnp.float32)
    return total

  return lambda: floor(weights, x)


def measure(model, batch: int, prompt: int, steps: int, max_seq_len: int) -> dict:
  graphdef, state = nnx.split(model)
  prefill = jax.jit(models.prefill_step, static_argnums=0, donate_argnums=4)
  decode = jax.jit(models.decode_step, static_argnums=0, donate_argnums=3)
  tokens = jax.random.randint(jax.random.key(0), (batch, prompt), 0,
                              model.config.vocab_size, jnp.int32)
  lengths = jnp.full((batch,), prompt, jnp.int32)
  cache = model.init_cache(batch, max_seq_len)
  start = time.perf_counter()
  logits, cache = prefill(graphdef, state, tokens, lengths, cache)
  logits.block_until_ready()
  first = time.perf_counter() - start
  token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits, cache = decode(graphdef, state, token, cache)  # compile
  logits.block_until_ready()
  floor = weights_floor(model, batch)
  floor().block_until_ready()
  times, floor_times = [], []
  for _ in range(steps):  # interleaved, so both see the same machine load
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t0 = time.perf_counter()
    logits, cache = decode(graphdef, state, token, cache)
    logits.block_until_ready()
    times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    floor().block_until_ready()
    floor_times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"batch": batch, "prefill_incl_compile_s": first, "median_ms": 1e3 * median,
          "best_ms": 1e3 * min(times), "tok_s": batch / median,
          "floor_median_ms": 1e3 * statistics.median(floor_times),
          "floor_best_ms": 1e3 * min(floor_times)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--max-seq-len", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--impl", default=None)
  args = parser.parse_args(argv)
  model, _ = models.load(args.model, dtype=args.dtype, impl=args.impl)
  print(f"{args.model} {args.dtype} impl={args.impl or 'default'} on {jax.devices()[0]}; "
        f"prompt {args.prompt}, max_seq_len {args.max_seq_len}, {args.steps} steps")
  for batch in args.batch:
    r = measure(model, batch, args.prompt, args.steps, args.max_seq_len)
    print(f"batch {batch}: decode step median {r['median_ms']:.1f} ms (best {r['best_ms']:.1f}), "
          f"{r['tok_s']:.1f} tok/s | weights-only floor median {r['floor_median_ms']:.1f} ms "
          f"(best {r['floor_best_ms']:.1f}) | load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
