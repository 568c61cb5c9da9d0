"""The correctness gate: every timed output against the xla reference, once per case.

The reference is the op's "xla" peer (or the public op with impl="xla") run on the same
inputs in the same dtype, so both sides carry rounding error: the gate is twice the
test tolerance for 16-bit outputs and allows TF32-class differences for fp32 (XLA may
use TF32 for fp32 dots). It exists so that a fast wrong kernel cannot win a benchmark;
precision itself is the tests' job (float64 oracle, `pallas_kernels.testing`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import testing

GATE_TOLERANCE = {
    jnp.dtype(jnp.bfloat16): 2 * testing.BASE_TOLERANCE[jnp.dtype(jnp.bfloat16)],
    jnp.dtype(jnp.float16): 2 * testing.BASE_TOLERANCE[jnp.dtype(jnp.float16)],
    jnp.dtype(jnp.float32): 2e-3,
}
DEFAULT_TOLERANCE = 2e-2


def to_host(tree) -> list[np.ndarray]:
  """The leaves of an output as float64 numpy arrays (the reference side, kept once)."""
  return [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in jax.tree.leaves(tree)]


def relative_error(out, ref_leaves: list[np.ndarray]) -> float:
  """The worst ‖out − ref‖ / ‖ref‖ over the output's leaves; NaN or inf gives inf."""
  leaves = jax.tree.leaves(out)
  if len(leaves) != len(ref_leaves):
    raise ValueError(f"output has {len(leaves)} arrays, the reference {len(ref_leaves)}")
  return max((testing.relative_error(o, r) for o, r in zip(leaves, ref_leaves)), default=0.0)


def tolerance(out) -> float:
  dtypes = [jnp.dtype(x.dtype) for x in jax.tree.leaves(out)]
  return max((GATE_TOLERANCE.get(d, DEFAULT_TOLERANCE) for d in dtypes), default=DEFAULT_TOLERANCE)


def verdict(out, ref_leaves, rtol: float | None = None) -> tuple[float, float, bool]:
  """(relative error, tolerance, passed). A shape mismatch fails with an infinite error."""
  tol = rtol if rtol is not None else tolerance(out)
  try:
    err = relative_error(out, ref_leaves)
  except (AssertionError, ValueError):  # shape or structure mismatch
    return float("inf"), tol, False
  return err, tol, bool(err <= tol)
