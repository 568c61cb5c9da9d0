"""Public matmul with fused epilogue and gated matmul: argument checks, then dispatch.

x is `[..., K]` with at least one leading dimension (every leading dimension is flattened
into M rows); weights are `[K, N]`; bias is `[N]`; residual is `[..., N]` (x's leading
dimensions). x, the weights, bias and residual share one float dtype (fp32, bf16, fp16).
Products accumulate in fp32; the epilogue runs on the fp32 accumulator before the one
rounding to the output dtype.

Implementations, in default order: "triton" (Ampere and Hopper), "mosaic" (Hopper only: a
warp-specialised TMA + wgmma kernel in Mosaic GPU, `mosaic.py`; bf16/fp16, K and N multiples
of 64; after "triton" until a GPU has validated it, so only `impl="mosaic"` or a
`MosaicMatmulConfig` selects it), "xla".

Gradients (reverse mode: jax.grad, vjp, under jit, vmap, checkpoint): "xla" by autodiff of
the reference; "triton" through a custom_vjp whose backward runs dx = dz @ w.T and
dw = x.T @ dz on the Pallas matmul kernel (dbias, dresidual from dz and the cotangent);
"mosaic" through the same backward, with its own forward saving the same residuals.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._core import checks, dispatch
from pallas_kernels.ops.matmul import mosaic as mosaic_impl
from pallas_kernels.ops.matmul import reference
from pallas_kernels.ops.matmul import triton as triton_impl
from pallas_kernels.ops.matmul.config import MatmulConfig
from pallas_kernels.ops.matmul.mosaic import MosaicMatmulConfig
from pallas_kernels.ops.matmul.reference import ACTIVATIONS


def _triton_refuses(*args, config=None, **kwargs) -> str | None:
  del args, kwargs
  if config is not None and not isinstance(config, MatmulConfig):
    return f"impl='triton' takes a MatmulConfig, got config={type(config).__name__}"
  return None


# "mosaic" after "triton": the default stays Triton until a real H100 has validated the kernel.
_MATMUL_IMPLS = (
    dispatch.Implementation("triton", triton_impl.matmul, refuses=_triton_refuses),
    dispatch.Implementation("mosaic", mosaic_impl.matmul, hopper_only=True,
                            refuses=mosaic_impl.refuses),
    dispatch.Implementation("xla", reference.matmul, is_pallas=False),
)
_GATED_IMPLS = (
    dispatch.Implementation("triton", triton_impl.gated_matmul, refuses=_triton_refuses),
    dispatch.Implementation("mosaic", mosaic_impl.gated_matmul, hopper_only=True,
                            refuses=mosaic_impl.gated_refuses),
    dispatch.Implementation("xla", reference.gated_matmul, is_pallas=False),
)


def _check_x(op: str, x) -> None:
  checks.array(op, "x", x, dtypes=checks.FLOAT_DTYPES)
  if x.ndim < 2:
    raise ValueError(f"{op}: `x` expected rank >= 2 [..., K] (at least one leading dimension), "
                     f"got shape {tuple(x.shape)}")


def _check_weight(op: str, name: str, w, x) -> None:
  checks.array(op, name, w, ndim=2, dtypes=checks.FLOAT_DTYPES, layout="[K, N]")
  checks.dim(op, name, w, 0, x.shape[-1], "K = x.shape[-1] (rows of `w` must match `x`'s last axis)")


def _check_config(op: str, config) -> None:
  checks.config_type(op, config, (MatmulConfig, MosaicMatmulConfig))


def _check_activation(op: str, activation) -> None:
  if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
    raise ValueError(f"{op}: `activation` expected one of {ACTIVATIONS}, got {activation!r}")


def _out_dtype(op: str, out_dtype, x):
  if out_dtype is None:
    return jnp.dtype(x.dtype)
  try:
    dtype = jnp.dtype(out_dtype)
  except TypeError:
    dtype = None
  if dtype not in [jnp.dtype(d) for d in checks.FLOAT_DTYPES]:
    names = ", ".join(jnp.dtype(d).name for d in checks.FLOAT_DTYPES)
    raise TypeError(f"{op}: `out_dtype` expected None or one of ({names}), got {out_dtype!r}")
  return dtype


def matmul(x, w, *, bias=None, activation: str | None = None, residual=None, out_dtype=None,
           impl: str | None = None, interpret: bool = False,
           config: MatmulConfig | MosaicMatmulConfig | None = None):
  """`act(x @ w + bias) + residual`: x [..., K] @ w [K, N] -> [..., N].

  activation is one of None, "silu", "gelu" (exact erf), "gelu_tanh", "relu"; it is
  applied after the bias and before the residual (the MLP/attention output projection
  adds the residual stream last). out_dtype defaults to x.dtype.
  impl: "triton", "mosaic" (Hopper; see the module docstring) or "xla"; None picks Triton on
  a GPU (or with interpret=True), else xla. config: a MatmulConfig (Triton) or a
  MosaicMatmulConfig (Mosaic); each implementation refuses the other's.
  """
  op = "matmul"
  _check_x(op, x)
  _check_weight(op, "w", w, x)
  n = w.shape[1]
  if bias is not None:
    checks.array(op, "bias", bias, dtypes=checks.FLOAT_DTYPES)
    checks.shape(op, "bias", bias, (n,), f"[N], N = w.shape[1] = {n}")
  if residual is not None:
    checks.array(op, "residual", residual, dtypes=checks.FLOAT_DTYPES)
    checks.shape(op, "residual", residual, (*x.shape[:-1], n), "[..., N]: x's leading dims, N")
  checks.same_dtype(op, ("x", "w", "bias", "residual"), (x, w, bias, residual))
  _check_activation(op, activation)
  out_dtype = _out_dtype(op, out_dtype, x)
  _check_config(op, config)
  return dispatch.call(op, impl, interpret, _MATMUL_IMPLS, x, w, bias=bias,
                       activation=activation, residual=residual, out_dtype=out_dtype,
                       config=config)


def gated_matmul(x, w_gate, w_up, *, activation: str | None = "silu", impl: str | None = None,
                 interpret: bool = False,
                 config: MatmulConfig | MosaicMatmulConfig | None = None):
  """`act(x @ w_gate) * (x @ w_up)`: SwiGLU (silu) or GeGLU (gelu, gelu_tanh); [..., N] in x.dtype.

  The Triton and Mosaic kernels read each x tile once for both products (two fp32
  accumulators).
  """
  op = "gated_matmul"
  _check_x(op, x)
  _check_weight(op, "w_gate", w_gate, x)
  _check_weight(op, "w_up", w_up, x)
  checks.shape(op, "w_up", w_up, tuple(w_gate.shape), "the shape of `w_gate`")
  checks.same_dtype(op, ("x", "w_gate", "w_up"), (x, w_gate, w_up))
  _check_activation(op, activation)
  _check_config(op, config)
  return dispatch.call(op, impl, interpret, _GATED_IMPLS, x, w_gate, w_up,
                       activation=activation, config=config)
