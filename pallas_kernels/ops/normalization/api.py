"""Public RMSNorm / LayerNorm: argument checks, then dispatch ("triton" or "xla").

x is `[..., D]` with at least one dimension: every leading dimension is flattened into
rows and the norm is taken over the last axis (a 1-D x is one row). weight and bias are
`[D]`; x, residual, weight and bias share one float dtype (fp32, bf16 or fp16); eps is a
positive Python float (static: it is baked into the kernel).

With `residual` the result is `(norm(h), h)`, `h = x + residual` rounded to x's dtype:
the pre-norm transformer step, in one pass over memory.

Gradients (reverse mode: jax.grad, vjp, under jit, vmap, checkpoint): "xla" by autodiff of
the reference; "triton" through a custom_vjp whose backward is a Pallas kernel (dx =
dresidual, and dweight/dbias reduced from per-program partials), rows padded wider than
8192 excepted (their backward runs as XLA ops).

`config` and `bwd_config` are `NormConfig`s of the forward and the backward kernel; each
defaults to the device's tuned table, else a heuristic (`config.resolve`, `resolve_bwd`).
"""

from __future__ import annotations

from pallas_kernels._core import checks, dispatch
from pallas_kernels.ops.normalization import reference
from pallas_kernels.ops.normalization import triton as triton_impl
from pallas_kernels.ops.normalization.config import NormConfig


_RMS_IMPLS = (
    dispatch.Implementation("triton", triton_impl.rms_norm, refuses=triton_impl.refuses),
    dispatch.Implementation("xla", reference.rms_norm, is_pallas=False),
)
_LAYER_IMPLS = (
    dispatch.Implementation("triton", triton_impl.layer_norm, refuses=triton_impl.refuses),
    dispatch.Implementation("xla", reference.layer_norm, is_pallas=False),
)


def _check(op: str, x, vectors: dict, residual, eps, config, bwd_config) -> None:
  """`vectors`: {"weight": ...} or {"weight": ..., "bias": ...}, each required `[D]`."""
  checks.array(op, "x", x, dtypes=checks.FLOAT_DTYPES)
  if x.ndim < 1:
    raise ValueError(f"{op}: `x` expected rank >= 1 [..., D], got shape {tuple(x.shape)}")
  width = x.shape[-1]
  if width < 1:
    raise ValueError(f"{op}: `x` expected a last axis D >= 1, got shape {tuple(x.shape)}")
  named = list(vectors.items())
  for name, vector in named:
    checks.array(op, name, vector, dtypes=checks.FLOAT_DTYPES)
    checks.shape(op, name, vector, (width,), f"[D], D = x.shape[-1] = {width}")
  if residual is not None:
    checks.array(op, "residual", residual, dtypes=checks.FLOAT_DTYPES)
    checks.shape(op, "residual", residual, tuple(x.shape), "the shape of `x`")
    named.append(("residual", residual))
  checks.same_dtype(op, ("x", *(n for n, _ in named)), (x, *(v for _, v in named)))
  checks.positive_float(op, "eps", eps, allow_none=False)
  checks.config_type(op, config, NormConfig)
  checks.config_type(op, bwd_config, NormConfig, "bwd_config")


def rms_norm(x, weight, *, eps: float = 1e-6, residual=None, impl: str | None = None,
             interpret: bool = False, config: NormConfig | None = None,
             bwd_config: NormConfig | None = None):
  """`x / sqrt(mean(x**2, -1) + eps) * weight`; with `residual`, `(rms_norm(h), h)`."""
  _check("rms_norm", x, {"weight": weight}, residual, eps, config, bwd_config)
  return dispatch.call("rms_norm", impl, interpret, _RMS_IMPLS, x, weight,
                       eps=eps, residual=residual, config=config, bwd_config=bwd_config)


def layer_norm(x, weight, bias, *, eps: float = 1e-5, residual=None, impl: str | None = None,
               interpret: bool = False, config: NormConfig | None = None,
               bwd_config: NormConfig | None = None):
  """`(x - mean) / sqrt(var + eps) * weight + bias` over the last axis; with `residual`,
  `(layer_norm(h), h)`."""
  _check("layer_norm", x, {"weight": weight, "bias": bias}, residual, eps, config, bwd_config)
  return dispatch.call("layer_norm", impl, interpret, _LAYER_IMPLS, x, weight, bias,
                       eps=eps, residual=residual, config=config, bwd_config=bwd_config)
