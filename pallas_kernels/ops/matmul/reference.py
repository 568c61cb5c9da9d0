"""Plain-JAX matmul with epilogue and gated matmul: the "xla" implementation and the test oracle.

Products accumulate in float32 (float64 when the inputs are float64, as in the tests'
oracle); the epilogue runs in the accumulator's type and only the result is rounded.
XLA may fuse the epilogue into the cuBLAS call (bias) or into one fusion after it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh", "relu")


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def activate(y, activation: str | None):
  """Activation `y -> act(y)`; `gelu` is the exact (erf) form, `gelu_tanh` the tanh one."""
  if activation is None:
    return y
  if activation == "silu":
    return jax.nn.silu(y)
  if activation == "gelu":
    return jax.nn.gelu(y, approximate=False)
  if activation == "gelu_tanh":
    return jax.nn.gelu(y, approximate=True)
  if activation == "relu":
    return jax.nn.relu(y)
  raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _product(x, w):
  """x [..., K] @ w [K, N] accumulated in at least float32 (full fp32, never TF32)."""
  return jnp.matmul(x, w, preferred_element_type=_acc_dtype(x.dtype),
                    precision=jax.lax.Precision.HIGHEST)


def matmul(x, w, *, bias=None, activation=None, residual=None, out_dtype=None):
  """`act(x @ w + bias) + residual`, rounded to `out_dtype` (default x.dtype)."""
  y = _product(x, w)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  y = activate(y, activation)
  if residual is not None:
    y = y + residual.astype(y.dtype)
  return y.astype(x.dtype if out_dtype is None else out_dtype)


def gated_matmul(x, w_gate, w_up, *, activation="silu"):
  """`act(x @ w_gate) * (x @ w_up)` (SwiGLU with silu, GeGLU with gelu), in x.dtype."""
  gate = activate(_product(x, w_gate), activation)
  return (gate * _product(x, w_up)).astype(x.dtype)
