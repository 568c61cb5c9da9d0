"""Plain-JAX RMSNorm and LayerNorm: the "xla" implementation and the float64 test oracle.

Statistics are computed in float32 (float64 when the inputs are float64, as in the
test oracle); the output has the input dtype. With a residual, `h = x + residual` is
rounded to the input dtype first, as an unfused model would store it, and the norm
is taken of that rounded `h`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _stats_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _rms(x, weight, eps):
  xf = x.astype(_stats_dtype(x.dtype))
  mean_square = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(mean_square + eps) * weight.astype(xf.dtype)
  return y.astype(x.dtype)


def _layer(x, weight, bias, eps):
  xf = x.astype(_stats_dtype(x.dtype))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centered = xf - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)  # two-pass: exact for large means
  y = centered * jax.lax.rsqrt(var + eps) * weight.astype(xf.dtype) + bias.astype(xf.dtype)
  return y.astype(x.dtype)


def _add_residual(x, residual):
  return (x + residual).astype(x.dtype)


def rms_norm(x, weight, *, eps: float = 1e-6, residual=None):
  if residual is None:
    return _rms(x, weight, eps)
  h = _add_residual(x, residual)
  return _rms(h, weight, eps), h


def layer_norm(x, weight, bias, *, eps: float = 1e-5, residual=None):
  if residual is None:
    return _layer(x, weight, bias, eps)
  h = _add_residual(x, residual)
  return _layer(h, weight, bias, eps), h
