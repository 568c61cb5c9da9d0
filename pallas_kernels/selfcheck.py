"""`python -m pallas_kernels.selfcheck`: run every op through every CPU-reachable impl on fresh
random inputs and print one table of relative errors against a float64 reference.

A quick health check of an installation (seconds, CPU only): the "triton" rows run the Pallas
kernels in interpret mode, so they check the kernels' logic, not their GPU speed.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import testing
from pallas_kernels.ops.attention import reference as attention_ref
from pallas_kernels.ops.decode_attention import reference as decode_ref
from pallas_kernels.ops.matmul import reference as matmul_ref
from pallas_kernels.ops.normalization import reference as norm_ref
from pallas_kernels.ops.paged_attention import reference as paged_ref


def _attention_inputs(key, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  q = testing.random_normal(kq, (2, 100, 6, 64), dtype)
  k = testing.random_normal(kk, (2, 100, 2, 64), dtype)
  v = testing.random_normal(kv, (2, 100, 2, 64), dtype)
  return (q, k, v), dict(lengths=jnp.array([100, 77], jnp.int32))


def _decode_inputs(key, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  q = testing.random_normal(kq, (2, 9, 64), dtype)
  k = testing.random_normal(kk, (2, 300, 3, 64), dtype)
  v = testing.random_normal(kv, (2, 300, 3, 64), dtype)
  return (q, k, v, jnp.array([300, 123], jnp.int32)), {}


def _paged_inputs(key, dtype):
  """The same sizes as _decode_inputs, in 16-row pages of a shuffled pool with 3 spare pages."""
  kq, kk, kv, kp = jax.random.split(key, 4)
  pool = (41, 16, 3, 64)
  tables = jax.random.permutation(kp, pool[0])[:38].reshape(2, 19).astype(jnp.int32)
  return (testing.random_normal(kq, (2, 9, 64), dtype), testing.random_normal(kk, pool, dtype),
          testing.random_normal(kv, pool, dtype), tables, jnp.array([300, 123], jnp.int32)), {}


def _matmul_inputs(key, dtype):
  kx, kw, kb = jax.random.split(key, 3)
  x = testing.random_normal(kx, (3, 70, 96), dtype)
  w = testing.random_normal(kw, (96, 200), dtype, scale=0.1)
  return (x, w), dict(bias=testing.random_normal(kb, (200,), dtype), activation="silu")


def _gated_inputs(key, dtype):
  kx, kg, ku = jax.random.split(key, 3)
  x = testing.random_normal(kx, (5, 96), dtype)
  return (x, testing.random_normal(kg, (96, 160), dtype, scale=0.1),
          testing.random_normal(ku, (96, 160), dtype, scale=0.1)), {}


def _norm_inputs(key, dtype):
  kx, kw, kr = jax.random.split(key, 3)
  x = testing.random_normal(kx, (37, 576), dtype)
  return (x, 1 + testing.random_normal(kw, (576,), dtype, scale=0.1)), dict(
      residual=testing.random_normal(kr, (37, 576), dtype))


def _layer_norm_inputs(key, dtype):
  (x, w), kwargs = _norm_inputs(key, dtype)
  return (x, w, testing.random_normal(jax.random.fold_in(key, 1), (576,), dtype)), kwargs


# (op name, public function, float64 reference, input builder, reduction length)
CHECKS = (
    ("attention", pk.attention, attention_ref.attention, _attention_inputs, 100),
    ("decode_attention", pk.decode_attention, decode_ref.decode_attention, _decode_inputs, 300),
    ("paged_attention", pk.paged_attention, paged_ref.paged_attention, _paged_inputs, 304),
    ("matmul", pk.matmul, matmul_ref.matmul, _matmul_inputs, 96),
    ("gated_matmul", pk.gated_matmul, matmul_ref.gated_matmul, _gated_inputs, 96),
    ("rms_norm", pk.rms_norm, norm_ref.rms_norm, _norm_inputs, 576),
    ("layer_norm", pk.layer_norm, norm_ref.layer_norm, _layer_norm_inputs, 576),
)
MODES = (("xla", False), ("triton", True))


def _first(out):
  return out[0] if isinstance(out, tuple) else out


def run(dtypes=(jnp.float32, jnp.bfloat16)) -> list[dict]:
  rows = []
  for name, fn, ref_fn, make, reduction_len in CHECKS:
    for dtype in dtypes:
      args, kwargs = make(jax.random.key(len(rows)), dtype)
      ref = _first(testing.float64_reference(ref_fn, *args, **kwargs))
      for impl, interpret in MODES:
        start = time.perf_counter()
        out = _first(fn(*args, **kwargs, impl=impl, interpret=interpret))
        seconds = time.perf_counter() - start
        err = testing.relative_error(out, ref)
        tol = testing.tolerance(dtype, reduction_len)
        rows.append(dict(op=name, dtype=jnp.dtype(dtype).name,
                         impl=impl + (" (interpret)" if interpret else ""),
                         shape="x".join(map(str, args[0].shape)), error=err, tolerance=tol,
                         seconds=seconds, ok=err <= tol))
  return rows


def main(argv=None) -> int:
  argparse.ArgumentParser(description=__doc__).parse_args(argv)
  print(f"pallax kernel self-check on {jax.devices()[0].device_kind} (jax {jax.__version__})")
  header = f"{'op':<17} {'dtype':<9} {'impl':<19} {'shape':<14} {'rel. error':>10} {'tol':>8} {'time':>7}  ok"
  print(header)
  print("-" * len(header))
  rows = run()
  for r in rows:
    print(f"{r['op']:<17} {r['dtype']:<9} {r['impl']:<19} {r['shape']:<14} {r['error']:>10.2e} "
          f"{r['tolerance']:>8.0e} {r['seconds']:>6.2f}s  {'yes' if r['ok'] else 'NO'}")
  failed = [r for r in rows if not r["ok"]]
  print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
