"""Shape catalogue of rms_norm / layer_norm from real models, and the peers to compare with.

Rows span decode batches (1, 16, 256) and prefill token counts (4096, 16384). A fused
case passes `residual` as a keyword array: `make_inputs` returns the positional
arguments followed by the arrays named in `array_kwargs` (see `bind`).

GRAD_CASES are training shapes (4096 and 16384 tokens) of the same ops for the backward
kernels: their inputs end with random cotangents of the outputs ("cotangent", or
"cotangent_0"/"cotangent_1" for (y, h)), and the audit and the benchmark run them as
`_core.specs.grad_of(op)`: the forward plus the vjp, as in a training step.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels._core.specs import Case
from pallas_kernels.ops.normalization import reference

ROWS = (1, 16, 256, 4096, 16384)
# (label, width, kind, eps)
MODELS = (
    ("smollm2-135m", 576, "rms", 1e-5),
    ("llama3-8b", 4096, "rms", 1e-5),
    ("llama3-70b", 8192, "rms", 1e-5),
    ("llama3-405b", 16384, "rms", 1e-5),
    ("gpt2", 768, "layer", 1e-5),
)
DTYPES = (jnp.bfloat16, jnp.float32)
# The offline audit's representative set: (model, rows, dtype, residual).
AUDIT = {
    ("smollm2-135m", 4096, "bfloat16", True),
    ("smollm2-135m", 1, "float32", False),
    ("llama3-8b", 4096, "bfloat16", False),
    ("llama3-8b", 16, "float32", True),
    ("llama3-70b", 4096, "float32", True),  # widest fp32 tile: the register-pressure case
    ("llama3-70b", 1, "bfloat16", True),
    ("llama3-405b", 16, "bfloat16", True),  # widest row the kernel takes
    ("gpt2", 4096, "float32", True),
    ("gpt2", 256, "bfloat16", False),
}



def _make_inputs(key, *, rows, width, dtype, kind, residual):
  kx, kw, kb, kr = jax.random.split(key, 4)
  x = jax.random.normal(kx, (rows, width), jnp.float32).astype(dtype)
  weight = (1.0 + 0.1 * jax.random.normal(kw, (width,), jnp.float32)).astype(dtype)
  args = (x, weight)
  if kind == "layer":
    args += (0.1 * jax.random.normal(kb, (width,), jnp.float32)).astype(dtype),
  if residual:
    args += jax.random.normal(kr, (rows, width), jnp.float32).astype(dtype),
  return args


def _floor(width: int, kind: str, rows: int, dtype, residual: bool) -> tuple[float, float]:
  """(flops, bytes_moved) of the forward: read x (+ residual), write y (+ h), read weight
  (+ bias) once."""
  itemsize = jnp.dtype(dtype).itemsize
  streams = 2 + 2 * residual
  vectors = 1 + (kind == "layer")
  flops_per_element = (4 if kind == "rms" else 7) + residual
  return (float(flops_per_element * rows * width),
          float((streams * rows + vectors) * width * itemsize))


def _case(model, width, kind, eps, rows, dtype, residual) -> Case:
  flops, bytes_moved = _floor(width, kind, rows, dtype, residual)
  name = jnp.dtype(dtype).name
  return Case(
      op="rms_norm" if kind == "rms" else "layer_norm",
      label=f"{model} {kind}_norm d={width} rows={rows} {name}{' +residual' if residual else ''}",
      make_inputs=functools.partial(_make_inputs, rows=rows, width=width, dtype=dtype,
                                    kind=kind, residual=residual),
      kwargs={"eps": eps},
      flops=flops,
      bytes_moved=bytes_moved,
      audit=(model, rows, name, residual) in AUDIT,
      array_kwargs=("residual",) if residual else (),
  )


CASES: list[Case] = [
    _case(model, width, kind, eps, rows, dtype, residual)
    for model, width, kind, eps in MODELS
    for rows in ROWS
    for dtype in DTYPES
    for residual in (False, True)
]


# --- Backward: training shapes ---------------------------------------------------------------

GRAD_ROWS = (4096, 16384)
# The audit's representative backward set: (model, rows, dtype, residual).
GRAD_AUDIT = {
    ("smollm2-135m", 4096, "bfloat16", True),   # narrow rows: 4 rows per tile
    ("llama3-8b", 4096, "bfloat16", False),
    ("llama3-70b", 4096, "float32", True),      # fp32 at 8192: the register-pressure case
    ("llama3-405b", 4096, "bfloat16", True),    # widest row: 32 elements per thread
    ("gpt2", 4096, "float32", True),            # LayerNorm: dweight and dbias accumulators
    ("gpt2", 4096, "bfloat16", False),
}


def bwd_floor(width: int, kind: str, rows: int, dtype, residual: bool,
              programs: int = 264) -> tuple[float, float]:
  """(flops, bytes) of the backward alone: read dy, h (+ dh), write dx (dresidual is the same
  array), read the weight, write and re-read `programs` fp32 partial rows per accumulator
  (264 = 2 per SM on an H100)."""
  itemsize = jnp.dtype(dtype).itemsize
  vectors = 1 + (kind == "layer")
  streams = 3 + residual
  flops_per_element = (11 if kind == "rms" else 15) + residual
  partials = 2 * vectors * programs * width * 4
  return (float(flops_per_element * rows * width),
          float((streams * rows + 1 + vectors) * width * itemsize + partials))


def _make_grad_inputs(key, *, rows, width, dtype, kind, residual):
  args = _make_inputs(key, rows=rows, width=width, dtype=dtype, kind=kind, residual=residual)
  cotangents = jax.random.normal(jax.random.fold_in(key, 1), (1 + residual, rows, width),
                                 jnp.float32).astype(dtype)
  return args + tuple(cotangents)


def _grad_case(model, width, kind, eps, rows, dtype, residual) -> Case:
  """`jax.grad` of sum(out * cotangent): forward plus backward, floor = the sum of both."""
  fwd_flops, fwd_bytes = _floor(width, kind, rows, dtype, residual)
  bwd_flops, bwd_bytes = bwd_floor(width, kind, rows, dtype, residual)
  name = jnp.dtype(dtype).name
  cotangents = ("cotangent_0", "cotangent_1") if residual else ("cotangent",)
  return Case(
      op="rms_norm" if kind == "rms" else "layer_norm",
      label=(f"grad {model} {kind}_norm d={width} rows={rows} {name}"
             f"{' +residual' if residual else ''}"),
      make_inputs=functools.partial(_make_grad_inputs, rows=rows, width=width, dtype=dtype,
                                    kind=kind, residual=residual),
      kwargs={"eps": eps},
      flops=fwd_flops + bwd_flops,
      bytes_moved=fwd_bytes + bwd_bytes,
      audit=(model, rows, name, residual) in GRAD_AUDIT,
      array_kwargs=("residual",) * residual + cotangents,
  )


GRAD_CASES: list[Case] = [
    *(_grad_case(model, width, kind, eps, rows, jnp.bfloat16, residual)
      for model, width, kind, eps in MODELS
      for rows in GRAD_ROWS
      for residual in (False, True)),
    # The fp32 audit rows, once each.
    *(_grad_case(model, width, kind, eps, rows, jnp.float32, residual)
      for model, width, kind, eps in MODELS
      for audit_model, rows, dtype, residual in sorted(GRAD_AUDIT)
      if audit_model == model and dtype == "float32"),
]


def _unfused(rms: Callable, layer: Callable) -> Callable:
  """A peer taking our arguments: bias present means layer_norm. Peers without a fused
  residual get an XLA add first (two passes over memory instead of our one)."""
  def fn(x, weight, bias=None, *, eps, residual=None):
    h = x if residual is None else x + residual
    y = rms(h, weight, eps=eps) if bias is None else layer(h, weight, bias, eps=eps)
    return y if residual is None else (y, h)
  return jax.jit(fn, static_argnames=("eps",))


def _xla_peer() -> Callable:
  def fn(x, weight, bias=None, *, eps, residual=None):
    if bias is None:
      return reference.rms_norm(x, weight, eps=eps, residual=residual)
    return reference.layer_norm(x, weight, bias, eps=eps, residual=residual)
  return jax.jit(fn, static_argnames=("eps",))


def _jax_pallas_peer() -> Callable:
  """jax.experimental.pallas.ops.gpu's forward kernels: one row per program, no residual."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import layer_norm as ln  # noqa: PLC0415
    from jax.experimental.pallas.ops.gpu import rms_norm as rms  # noqa: PLC0415

  def as_rows(fn, x, weight, bias, eps):
    # They vmap over two leading axes; positional (x, weight, bias, num_warps, num_stages,
    # eps) because those are custom_vjp nondiff arguments.
    return fn(x.reshape(1, -1, x.shape[-1]), weight, bias, None, 3, eps).reshape(x.shape)

  def rms_fn(x, weight, *, eps):
    return as_rows(rms.rms_norm, x, weight, jnp.zeros_like(weight), eps)  # theirs adds a bias

  def layer_fn(x, weight, bias, *, eps):
    return as_rows(ln.layer_norm, x, weight, bias, eps)

  return _unfused(rms_fn, layer_fn)


def _tokamax_peer() -> Callable:
  import tokamax  # noqa: PLC0415 (optional)

  def rms_fn(x, weight, *, eps):
    return tokamax.layer_norm(x, weight, None, epsilon=eps, subtract_mean=False,
                              implementation="triton")

  def layer_fn(x, weight, bias, *, eps):
    return tokamax.layer_norm(x, weight, bias, epsilon=eps, subtract_mean=True,
                              implementation="triton")

  return _unfused(rms_fn, layer_fn)


def peers() -> dict[str, Callable]:
  """Other implementations taking the public op's arguments (bias present = layer_norm).

  "xla" is our jitted reference (XLA fuses its residual add). "jax-pallas" and "tokamax"
  have no residual input: their fused cases run an XLA add, then their kernel. GPU only.
  """
  out = {"xla": _xla_peer(), "jax-pallas": _jax_pallas_peer()}
  try:
    out["tokamax"] = _tokamax_peer()
  except ImportError:
    pass
  return out
