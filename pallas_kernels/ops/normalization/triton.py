"""RMSNorm / LayerNorm (optionally fused with the residual add) as one Pallas Triton kernel.

One pass over HBM: program `i` loads rows `[i * block_rows, (i + 1) * block_rows)` of x
(and of the residual) as one `[block_rows, block_width]` tile, `block_width` being the
row width padded to the next power of two (the Triton lowering only takes power-of-two
tensor shapes). Columns past the width and rows past the end are masked on load (read
as 0, so they add nothing to the sums) and on store. Statistics are float32; LayerNorm
takes the variance of the centred tile (two passes over registers, no cancellation).

Rows wider than `config.MAX_BLOCK_WIDTH` after padding are refused (`refuses`), so
dispatch falls back to XLA: one program would need more registers than an SM has.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._core import compat
from pallas_kernels.ops.normalization import config as config_lib


def _norm_kernel(x_ref, residual_ref, weight_ref, bias_ref, y_ref, h_ref, *,
                 eps: float, rows: int, width: int, subtract_mean: bool):
  # x_ref, residual_ref, y_ref, h_ref: [block_rows, block_width]
  # weight_ref, bias_ref: [block_width]
  block_rows, block_width = x_ref.shape
  row = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  col_ok = jnp.arange(block_width) < width
  mask = (row < rows)[:, None] & col_ok[None, :]

  # No eviction hints: weight/bias (<= 32 KB) stay in L2 anyway, and the audit's triton wheel
  # cannot parse jaxlib's pretty form of `evictionPolicy` (bench/notes/normalization.md).
  h = plgpu.load(x_ref, mask=mask, other=0.0)
  if residual_ref is not None:
    residual = plgpu.load(residual_ref, mask=mask, other=0.0)
    # Round h to the input dtype, as an unfused model would store it, and normalize that.
    h = (h.astype(jnp.float32) + residual.astype(jnp.float32)).astype(h_ref.dtype)
    plgpu.store(h_ref, h, mask=mask)
  h = h.astype(jnp.float32)

  if subtract_mean:
    mean = jnp.sum(h, axis=1, keepdims=True) / width
    h = jnp.where(col_ok[None, :], h - mean, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(h * h, axis=1, keepdims=True) / width + eps)

  weight = plgpu.load(weight_ref, mask=col_ok, other=0.0)
  y = h * rstd * weight.astype(jnp.float32)[None, :]
  if bias_ref is not None:
    bias = plgpu.load(bias_ref, mask=col_ok, other=0.0)
    y = y + bias.astype(jnp.float32)[None, :]
  plgpu.store(y_ref, y.astype(y_ref.dtype), mask=mask)


def _kernel_for(fused: bool, has_bias: bool, **params):
  """Adapt the fixed ref order of `_norm_kernel` to the refs this call actually has."""
  def kernel(*refs):
    refs = list(refs)
    x_ref = refs.pop(0)
    residual_ref = refs.pop(0) if fused else None
    weight_ref = refs.pop(0)
    bias_ref = refs.pop(0) if has_bias else None
    y_ref = refs.pop(0)
    h_ref = refs.pop(0) if fused else None
    _norm_kernel(x_ref, residual_ref, weight_ref, bias_ref, y_ref, h_ref, **params)
  return kernel


@functools.partial(jax.jit, static_argnames=("eps", "kind", "cfg", "interpret"))
def _norm_rows(x, residual, weight, bias, *, eps: float, kind: str, cfg: config_lib.NormConfig,
               interpret: bool):
  """x, residual: [rows, width]; weight, bias: [width]. Returns y or (y, h)."""
  rows, width = x.shape
  block_width = config_lib.next_power_of_2(width)
  # No point in a block taller than the input (decode batches are often 1..8 rows).
  block_rows = min(cfg.block_rows, config_lib.next_power_of_2(rows))
  fused = residual is not None
  has_bias = bias is not None

  tile = pl.BlockSpec((block_rows, block_width), lambda i: (i, 0))
  vector = pl.BlockSpec((block_width,), lambda i: (0,))
  in_specs = [tile] + [tile] * fused + [vector] + [vector] * has_bias
  inputs = [x] + [residual] * fused + [weight] + [bias] * has_bias
  out_shape = [jax.ShapeDtypeStruct((rows, width), x.dtype)] * (1 + fused)

  kernel = _kernel_for(fused, has_bias, eps=eps, rows=rows, width=width,
                       subtract_mean=kind == "layer")
  outs = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(rows, block_rows),),
      in_specs=in_specs,
      out_specs=[tile] * (1 + fused),
      out_shape=out_shape,
      compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name=f"{kind}_norm{'_residual' if fused else ''}",
  )(*inputs)
  return (outs[0], outs[1]) if fused else outs[0]


def _norm(x, weight, bias, *, eps, residual, kind, interpret, config):
  width = x.shape[-1]
  if x.size == 0:  # an empty batch: nothing to launch
    return (x, x) if residual is not None else x
  cfg = config_lib.resolve(config, width, x.dtype, residual is not None, kind)
  rows_shape = (-1, width)
  out = _norm_rows(x.reshape(rows_shape),
                   None if residual is None else residual.reshape(rows_shape),
                   weight, bias, eps=float(eps), kind=kind, cfg=cfg, interpret=interpret)
  if residual is None:
    return out.reshape(x.shape)
  return out[0].reshape(x.shape), out[1].reshape(x.shape)


def rms_norm(x, weight, *, eps=1e-6, residual=None, interpret=False, config=None):
  return _norm(x, weight, None, eps=eps, residual=residual, kind="rms",
               interpret=interpret, config=config)


def layer_norm(x, weight, bias, *, eps=1e-5, residual=None, interpret=False, config=None):
  return _norm(x, weight, bias, eps=eps, residual=residual, kind="layer",
               interpret=interpret, config=config)


def refuses(x, *args, **kwargs) -> str | None:
  """Why the Triton kernel cannot run this call (None when it can)."""
  block_width = config_lib.next_power_of_2(x.shape[-1])
  if block_width > config_lib.MAX_BLOCK_WIDTH:
    return (f"rows of width {x.shape[-1]} (padded to {block_width}) exceed the "
            f"{config_lib.MAX_BLOCK_WIDTH} elements one program holds in registers; "
            f"use impl='xla'")
  return None
