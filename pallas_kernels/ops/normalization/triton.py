"""RMSNorm / LayerNorm (optionally fused with the residual add) as one Pallas Triton kernel.

One pass over HBM: program `i` loads rows `[i * block_rows, (i + 1) * block_rows)` of x
(and of the residual) as one `[block_rows, block_width]` tile, `block_width` being the
row width padded to the next power of two (the Triton lowering only takes power-of-two
tensor shapes). Columns past the width and rows past the end are masked on load (read
as 0, so they add nothing to the sums) and on store. Statistics are float32; LayerNorm
takes the variance of the centred tile (two passes over registers, no cancellation).

Rows wider than `config.MAX_BLOCK_WIDTH` after padding are refused (`refuses`), so
dispatch falls back to XLA: one program would need more registers than an SM has.

Gradients (`jax.custom_vjp` around the row kernel): the backward is one more Pallas kernel,
`_norm_bwd_kernel`. It recomputes mean/rstd from h instead of saving them: it reads h anyway
(for x_hat), so the statistics cost a register reduction and no HBM bytes, the forward stays
one kernel with one or two outputs, and the saved residuals are only h and the weight (h is
x itself, or the forward's second output). A grid of at most `config.bwd_programs` programs
loops over row blocks; each program keeps fp32 dweight (and dbias) sums of its rows in
registers and writes one partial row, and a jnp sum over the few hundred partials finishes
them: no atomics, and partial traffic a few % of the streams. With the fused residual,
dx = dresidual = d(norm path) + dh, added in fp32 in the kernel and rounded once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._core import compat, device
from pallas_kernels.ops.normalization import config as config_lib
from pallas_kernels.ops.normalization import reference


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


# --- Backward --------------------------------------------------------------------------------

def _load(ref, mask):
  return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def _and(a, b):
  return b if a is None else a if b is None else a & b


def _norm_bwd_kernel(dy_ref, h_ref, dh_ref, weight_ref, dx_ref, dw_ref, db_ref, *, eps: float,
                     rows: int, width: int, block_rows: int, block_width: int, programs: int,
                     subtract_mean: bool):
  # dy_ref, h_ref, dh_ref, dx_ref: [rows, block_width] blocks of [rows, width] arrays, read and
  # written in [block_rows, block_width] tiles; weight_ref: [block_width]; dw_ref, db_ref:
  # [programs, block_width] blocks of [programs, width] fp32 partial sums.
  pid = pl.program_id(0)
  cols = pl.ds(0, block_width)
  # Masks only where a dimension is ragged (shapes are static): a 4096- or 16384-wide row
  # in blocks of whole rows needs none, and saves the registers they would take.
  col_ok = None if width == block_width else jnp.arange(block_width) < width
  col_mask = None if col_ok is None else jnp.broadcast_to(col_ok[None, :],
                                                          (block_rows, block_width))
  weight = _load(weight_ref.at[cols], col_ok).astype(jnp.float32)[None, :]

  def body(step, accs):
    # Program pid takes row blocks pid, pid + programs, ...: programs resident together
    # stream neighbouring rows, and every program gets the same count, +-1.
    row0 = (pid + step * programs) * block_rows
    tile = (pl.ds(row0, block_rows), cols)
    row_mask = None
    if rows % block_rows:
      row_ok = (row0 + jnp.arange(block_rows)) < rows
      row_mask = jnp.broadcast_to(row_ok[:, None], (block_rows, block_width))
    mask = _and(row_mask, col_mask)
    h = _load(h_ref.at[tile], mask).astype(jnp.float32)
    dy = _load(dy_ref.at[tile], mask).astype(jnp.float32)
    if subtract_mean:
      h = h - jnp.sum(h, axis=1, keepdims=True) / width
      if col_mask is not None:
        h = jnp.where(col_mask, h, 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(h * h, axis=1, keepdims=True) / width + eps)
    x_hat = h * rstd
    # Masked rows and columns load dy = 0: they add nothing to the sums. Summed before g is
    # formed, so that dy is dead once g exists (fewer live registers per element).
    accs = (accs[0] + dy * x_hat,) + ((accs[1] + dy,) if db_ref is not None else ())
    g = dy * weight
    # d x_hat -> d h: remove the components along x_hat (and, for LayerNorm, along 1).
    dx = g - x_hat * (jnp.sum(g * x_hat, axis=1, keepdims=True) / width)
    if subtract_mean:
      dx = dx - jnp.sum(g, axis=1, keepdims=True) / width
    dx = dx * rstd
    if dh_ref is not None:
      dx = dx + _load(dh_ref.at[tile], mask).astype(jnp.float32)
    plgpu.store(dx_ref.at[tile], dx.astype(dx_ref.dtype), mask=mask)
    return accs

  steps = (pl.cdiv(rows, block_rows) - pid + programs - 1) // programs
  zeros = tuple(jnp.zeros((block_rows, block_width), jnp.float32)
                for _ in range(1 + (db_ref is not None)))
  accs = jax.lax.fori_loop(0, steps, body, zeros)
  plgpu.store(dw_ref.at[pid, cols], jnp.sum(accs[0], axis=0), mask=col_ok)
  if db_ref is not None:
    plgpu.store(db_ref.at[pid, cols], jnp.sum(accs[1], axis=0), mask=col_ok)


def _bwd_kernel_for(fused: bool, has_bias: bool, **params):
  """Adapt the fixed ref order of `_norm_bwd_kernel` to the refs this call has."""
  def kernel(*refs):
    refs = list(refs)
    dy_ref, h_ref = refs.pop(0), refs.pop(0)
    dh_ref = refs.pop(0) if fused else None
    weight_ref, dx_ref, dw_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    db_ref = refs.pop(0) if has_bias else None
    _norm_bwd_kernel(dy_ref, h_ref, dh_ref, weight_ref, dx_ref, dw_ref, db_ref, **params)
  return kernel


def _bwd_programs(rows: int, cfg: config_lib.NormConfig) -> int:
  """Programs of the backward grid for this many rows on the current target."""
  block_rows = min(cfg.block_rows, config_lib.next_power_of_2(rows))
  return config_lib.bwd_programs(pl.cdiv(rows, block_rows), device.current_target())


@functools.partial(jax.jit, static_argnames=("eps", "kind", "cfg", "programs", "interpret"))
def _norm_bwd_rows(dy, h, dh, weight, *, eps: float, kind: str, cfg: config_lib.NormConfig,
                   programs: int, interpret: bool):
  """dy, h, dh: [rows, width]; weight: [width]. Returns (dx, dweight, dbias or None)."""
  rows, width = h.shape
  block_width = config_lib.next_power_of_2(width)
  block_rows = min(cfg.block_rows, config_lib.next_power_of_2(rows))
  fused, has_bias = dh is not None, kind == "layer"
  partial = jax.ShapeDtypeStruct((programs, width), jnp.float32)
  kernel = _bwd_kernel_for(fused, has_bias, eps=eps, rows=rows, width=width,
                           block_rows=block_rows, block_width=block_width, programs=programs,
                           subtract_mean=has_bias)
  # Every program sees whole arrays, widened to the power-of-two tile width as blocks: the
  # kernel's [:, 0:block_width] column slices are then in bounds (jax 0.12 checks static
  # slices against the ref), and the masks keep the padding out of the sums.
  rows_spec = pl.BlockSpec((rows, block_width), lambda i: (0, 0))
  partial_spec = pl.BlockSpec((programs, block_width), lambda i: (0, 0))
  outs = pl.pallas_call(
      kernel,
      grid=(programs,),
      in_specs=[rows_spec] * (2 + fused) + [pl.BlockSpec((block_width,), lambda i: (0,))],
      out_specs=[rows_spec] + [partial_spec] * (1 + has_bias),
      out_shape=[jax.ShapeDtypeStruct((rows, width), h.dtype)] + [partial] * (1 + has_bias),
      compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name=f"{kind}_norm_bwd{'_residual' if fused else ''}",
  )(*([dy, h] + [dh] * fused + [weight]))
  dweight = jnp.sum(outs[1], axis=0).astype(weight.dtype)
  dbias = jnp.sum(outs[2], axis=0).astype(weight.dtype) if has_bias else None
  return outs[0], dweight, dbias


class _Static(NamedTuple):
  """The non-array arguments of one differentiable norm call."""
  eps: float
  kind: str
  cfg: config_lib.NormConfig
  bwd_cfg: config_lib.NormConfig | None  # explicit `bwd_config`; None: resolved in the backward
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _norm_diff(x, residual, weight, bias, static: _Static):
  """`_norm_rows` with the Pallas backward: x, residual [rows, width]; residual/bias may be None."""
  return _norm_rows(x, residual, weight, bias, eps=static.eps, kind=static.kind, cfg=static.cfg,
                    interpret=static.interpret)


def _norm_diff_fwd(x, residual, weight, bias, static: _Static):
  out = _norm_diff(x, residual, weight, bias, static)
  h = x if residual is None else out[1]  # the rounded sum the norm was taken of
  return out, (h, weight)


def _norm_bwd_xla(dy, h, dh, weight, *, eps: float, kind: str):
  """The backward as XLA ops (autodiff of the reference in fp32), for rows too wide for the
  kernel (`config.BWD_MAX_BLOCK_WIDTH`): same results, more passes over memory."""
  def norm(h, weight, bias):
    if kind == "rms":
      return reference.rms_norm(h, weight, eps=eps)
    return reference.layer_norm(h, weight, bias, eps=eps)
  f32 = lambda a: a.astype(jnp.float32)
  bias = jnp.zeros_like(f32(weight)) if kind == "layer" else None
  _, vjp = jax.vjp(norm, f32(h), f32(weight), bias)
  dx, dweight, dbias = vjp(f32(dy))
  if dh is not None:
    dx = dx + f32(dh)
  return (dx.astype(h.dtype), dweight.astype(weight.dtype),
          None if dbias is None else dbias.astype(weight.dtype))


def _norm_diff_bwd(static: _Static, saved, cotangent):
  h, weight = saved
  fused = isinstance(cotangent, tuple)
  dy, dh = cotangent if fused else (cotangent, None)
  rows, width = h.shape
  if config_lib.next_power_of_2(width) > config_lib.BWD_MAX_BLOCK_WIDTH:
    dx, dweight, dbias = _norm_bwd_xla(dy, h, dh, weight, eps=static.eps, kind=static.kind)
    return dx, dx if fused else None, dweight, dbias
  cfg = config_lib.resolve_bwd(static.bwd_cfg, width, h.dtype, fused, static.kind)
  programs = _bwd_programs(rows, cfg)
  dx, dweight, dbias = _norm_bwd_rows(dy, h, dh, weight, eps=static.eps, kind=static.kind,
                                      cfg=cfg, programs=programs, interpret=static.interpret)
  # h = x + residual: both get the same cotangent.
  return dx, dx if fused else None, dweight, dbias


_norm_diff.defvjp(_norm_diff_fwd, _norm_diff_bwd)


def _norm(x, weight, bias, *, eps, residual, kind, interpret, config, bwd_config):
  width = x.shape[-1]
  if x.size == 0:  # an empty batch: nothing to launch
    return (x, x) if residual is not None else x
  cfg = config_lib.resolve(config, width, x.dtype, residual is not None, kind)
  rows_shape = (-1, width)
  out = _norm_diff(x.reshape(rows_shape),
                   None if residual is None else residual.reshape(rows_shape),
                   weight, bias, _Static(float(eps), kind, cfg, bwd_config, interpret))
  if residual is None:
    return out.reshape(x.shape)
  return out[0].reshape(x.shape), out[1].reshape(x.shape)


def rms_norm(x, weight, *, eps=1e-6, residual=None, interpret=False, config=None,
             bwd_config=None):
  return _norm(x, weight, None, eps=eps, residual=residual, kind="rms",
               interpret=interpret, config=config, bwd_config=bwd_config)


def layer_norm(x, weight, bias, *, eps=1e-5, residual=None, interpret=False, config=None,
               bwd_config=None):
  return _norm(x, weight, bias, eps=eps, residual=residual, kind="layer",
               interpret=interpret, config=config, bwd_config=bwd_config)


def refuses(x, *args, **kwargs) -> str | None:
  """Why the Triton kernel cannot run this call (None when it can)."""
  block_width = config_lib.next_power_of_2(x.shape[-1])
  if block_width > config_lib.MAX_BLOCK_WIDTH:
    return (f"rows of width {x.shape[-1]} (padded to {block_width}) exceed the "
            f"{config_lib.MAX_BLOCK_WIDTH} elements one program holds in registers; "
            f"use impl='xla'")
  return None
