"""Tiled matmul with a fused epilogue, and the gated (SwiGLU/GeGLU) matmul, lowered through Triton.

One program computes one `[block_m, block_n]` output tile: a K loop of tensor-core dots
(`[block_m, block_k] @ [block_k, block_n]`, fp32 accumulator), then the epilogue
(bias, activation, residual, or the gate product) on the accumulator in registers, then
one masked store. The grid is 1-D: program ids are mapped to tiles in groups of `group_m`
tile rows (Triton's tutorial "grouped ordering"), so programs running at the same time
share x row stripes and w column stripes in L2 instead of each streaming its own.

Refs are whole arrays (no BlockSpecs): the kernel computes its own tile offsets and masks
the ragged edges of M, N and K. Masks are built only where a dimension is not a multiple of
its block (all shapes are static), so aligned shapes compile to unmasked, vectorised loads.

Under vmap with shared weights, the batch axis is folded into the rows (`custom_vmap`):
one launch that streams the weights once, instead of one grid slice per batch element.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._core import compat
from pallas_kernels.ops.matmul import config as config_lib
from pallas_kernels.ops.matmul import reference
from pallas_kernels.ops.matmul.config import MatmulConfig

# erf has no Triton lowering in Pallas; this is XLA's float32 rational approximation
# (max abs error ~3e-7 over the reals), evaluated in fp32 on the accumulator.
_ERF_ALPHA = (0.00022905065861350646, 0.0034082910107109506, 0.050955695062380861,
              0.18520832239976145, 1.128379143519084)
_ERF_BETA = (-1.1791602954361697e-7, 0.000023547966471313185, 0.0010179625278914885,
             0.014070470171167667, 0.11098505178285362, 0.49746925110067538, 1.0)
_ERF_CLAMP = 3.7439211627767994  # erf(x) rounds to +-1 in fp32 beyond this


def _erf(x):
  x = jnp.clip(x, -_ERF_CLAMP, _ERF_CLAMP)
  x2 = x * x
  p = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_ALPHA[1:], jnp.full_like(x, _ERF_ALPHA[0]))
  q = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_BETA[1:], jnp.full_like(x, _ERF_BETA[0]))
  return x * p / q


def _activate(y, activation: str | None):
  """Activations from lowerable primitives (logistic, tanh, max; erf as a polynomial)."""
  if activation is None:
    return y
  if activation == "silu":
    return y * lax.logistic(y)
  if activation == "gelu":
    return 0.5 * y * (1.0 + _erf(y * (1.0 / math.sqrt(2.0))))
  if activation == "gelu_tanh":
    inner = math.sqrt(2.0 / math.pi) * (y + 0.044715 * y * y * y)
    return 0.5 * y * (1.0 + jnp.tanh(inner))
  if activation == "relu":
    return jnp.maximum(y, 0.0)
  raise ValueError(f"unknown activation {activation!r}")


def _grouped_tile(pid, *, grid_m: int, grid_n: int, group_m: int):
  """Program id -> (tile row, tile column) in grouped order.

  Programs walk down `group_m` tile rows before moving one tile column right; the last
  group holds the leftover rows when grid_m is not a multiple of group_m.
  """
  tiles_per_group = group_m * grid_n
  group = lax.div(pid, tiles_per_group)
  first_row = group * group_m
  rows_in_group = jnp.minimum(grid_m - first_row, group_m)
  within = lax.rem(pid, tiles_per_group)
  return first_row + lax.rem(within, rows_in_group), lax.div(within, rows_in_group)


def _span_mask(start, block: int, limit: int):
  """[block] bool: start + i < limit; None when `limit` is a multiple of `block` (static)."""
  if limit % block == 0:
    return None
  return start + jnp.arange(block) < limit


def _tile_mask(row_mask, col_mask, shape):
  """2-D mask from optional row and column masks; None when both are None."""
  if row_mask is None and col_mask is None:
    return None
  if row_mask is None:
    return jnp.broadcast_to(col_mask[None, :], shape)
  if col_mask is None:
    return jnp.broadcast_to(row_mask[:, None], shape)
  return row_mask[:, None] & col_mask[None, :]


def _load(ref, mask):
  if mask is None:
    return plt.load(ref)
  return plt.load(ref, mask=mask, other=0)


def _accumulate(x_ref, w_refs, row0, col0, row_mask, col_mask, *, k: int, block_m: int,
                block_n: int, block_k: int, precision):
  """fp32 `[block_m, block_n]` products of one x row stripe with each w column stripe.

  Each x tile is loaded once per K step and feeds every weight's dot (the gated matmul's
  two accumulators share it).
  """
  rows = pl.ds(row0, block_m)
  cols = pl.ds(col0, block_n)

  def body(step, accs):
    k0 = step * block_k
    k_mask = _span_mask(k0, block_k, k)
    x = _load(x_ref.at[rows, pl.ds(k0, block_k)],  # [block_m, block_k]
              _tile_mask(row_mask, k_mask, (block_m, block_k)))
    w_mask = _tile_mask(k_mask, col_mask, (block_k, block_n))
    new = []
    for acc, w_ref in zip(accs, w_refs):
      w = _load(w_ref.at[pl.ds(k0, block_k), cols], w_mask)  # [block_k, block_n]
      new.append(acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision))
    return tuple(new)

  zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in w_refs)
  return lax.fori_loop(0, pl.cdiv(k, block_k), body, zeros)


def _tile_setup(m: int, n: int, cfg: MatmulConfig):
  grid_m, grid_n = pl.cdiv(m, cfg.block_m), pl.cdiv(n, cfg.block_n)
  tile_m, tile_n = _grouped_tile(pl.program_id(0), grid_m=grid_m, grid_n=grid_n,
                                 group_m=cfg.group_m)
  row0, col0 = tile_m * cfg.block_m, tile_n * cfg.block_n
  row_mask = _span_mask(row0, cfg.block_m, m)
  col_mask = _span_mask(col0, cfg.block_n, n)
  return row0, col0, row_mask, col_mask


def _matmul_kernel(x_ref, w_ref, *refs, m: int, n: int, k: int, cfg: MatmulConfig,
                   activation: str | None, has_bias: bool, has_residual: bool, precision):
  # x_ref [m, k], w_ref [k, n], bias_ref [n], residual_ref [m, n], o_ref [m, n]
  refs = list(refs)
  bias_ref = refs.pop(0) if has_bias else None
  residual_ref = refs.pop(0) if has_residual else None
  (o_ref,) = refs
  row0, col0, row_mask, col_mask = _tile_setup(m, n, cfg)
  (y,) = _accumulate(x_ref, (w_ref,), row0, col0, row_mask, col_mask, k=k, block_m=cfg.block_m,
                     block_n=cfg.block_n, block_k=cfg.block_k, precision=precision)
  rows, cols = pl.ds(row0, cfg.block_m), pl.ds(col0, cfg.block_n)
  out_mask = _tile_mask(row_mask, col_mask, (cfg.block_m, cfg.block_n))
  if bias_ref is not None:
    y += _load(bias_ref.at[cols], col_mask).astype(jnp.float32)[None, :]  # [block_n]
  y = _activate(y, activation)
  if residual_ref is not None:
    y += _load(residual_ref.at[rows, cols], out_mask).astype(jnp.float32)  # [block_m, block_n]
  plt.store(o_ref.at[rows, cols], y.astype(o_ref.dtype), mask=out_mask)


def _gated_kernel(x_ref, w_gate_ref, w_up_ref, o_ref, *, m: int, n: int, k: int,
                  cfg: MatmulConfig, activation: str | None, precision):
  # x_ref [m, k], w_gate_ref [k, n], w_up_ref [k, n], o_ref [m, n]
  row0, col0, row_mask, col_mask = _tile_setup(m, n, cfg)
  gate, up = _accumulate(x_ref, (w_gate_ref, w_up_ref), row0, col0, row_mask, col_mask, k=k,
                         block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                         precision=precision)
  y = _activate(gate, activation) * up
  out_mask = _tile_mask(row_mask, col_mask, (cfg.block_m, cfg.block_n))
  plt.store(o_ref.at[pl.ds(row0, cfg.block_m), pl.ds(col0, cfg.block_n)],
            y.astype(o_ref.dtype), mask=out_mask)


def _precision(dtype):
  # fp32 inputs: full-precision FMA dots (the default would be TF32, ~1e-3 relative error).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _launch(kernel, name: str, operands, m: int, n: int, k: int, out_dtype, cfg: MatmulConfig,
            interpret: bool, flops: int):
  grid = (pl.cdiv(m, cfg.block_m) * pl.cdiv(n, cfg.block_n),)
  bytes_accessed = sum(a.size * a.dtype.itemsize for a in operands)
  bytes_accessed += m * n * jnp.dtype(out_dtype).itemsize
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=grid,
      compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                    bytes_accessed=bytes_accessed),
      interpret=interpret, name=name)(*operands)


def _fold_vmap_into_rows(fn, num_row_args: int):
  """`fn(*row_args, *shared_args)` whose vmap folds the batch axis into the rows when it can.

  Row arguments (x, residual) have leading dimensions that the kernel flattens into M
  anyway; when only they are batched, the vmapped axis becomes one more leading dimension:
  one launch that streams the weights once. Pallas's own batching rule would add a grid
  axis instead and re-read every weight tile once per batch element (B times the bytes of
  a decode GEMV). Batched weights or bias fall back to that rule.
  """
  @jax.custom_batching.custom_vmap
  def folded(*args):
    return fn(*args)

  @folded.def_vmap
  def rule(axis_size, in_batched, *args):
    if any(jax.tree.leaves(in_batched[num_row_args:])):
      in_axes = tuple(0 if batched else None for batched in in_batched)
      return jax.vmap(fn, in_axes=in_axes)(*args), True
    rows = [a if a is None or batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip(args[:num_row_args], in_batched)]
    return folded(*rows, *args[num_row_args:]), True

  return folded


def _matmul(x, residual, w, bias, *, activation, out_dtype, interpret, config):
  *lead, k = x.shape
  n = w.shape[1]
  m = math.prod(lead)
  if m == 0 or n == 0 or k == 0:  # nothing to tile; the reference handles empty shapes
    return reference.matmul(x, w, bias=bias, activation=activation, residual=residual,
                            out_dtype=out_dtype)
  cfg = config_lib.resolve(config, m, n, k, x.dtype, gated=False)
  operands = [x.reshape(m, k), w]
  if bias is not None:
    operands.append(bias)
  if residual is not None:
    operands.append(residual.reshape(m, n))
  kernel = functools.partial(_matmul_kernel, m=m, n=n, k=k, cfg=cfg, activation=activation,
                             has_bias=bias is not None, has_residual=residual is not None,
                             precision=_precision(x.dtype))
  out = _launch(kernel, "matmul", operands, m, n, k, out_dtype, cfg, interpret, 2 * m * n * k)
  return out.reshape(*lead, n)


def _gated_matmul(x, w_gate, w_up, *, activation, interpret, config):
  *lead, k = x.shape
  n = w_gate.shape[1]
  m = math.prod(lead)
  if m == 0 or n == 0 or k == 0:
    return reference.gated_matmul(x, w_gate, w_up, activation=activation)
  cfg = config_lib.resolve(config, m, n, k, x.dtype, gated=True)
  kernel = functools.partial(_gated_kernel, m=m, n=n, k=k, cfg=cfg, activation=activation,
                             precision=_precision(x.dtype))
  out = _launch(kernel, "gated_matmul", [x.reshape(m, k), w_gate, w_up], m, n, k, x.dtype, cfg,
                interpret, 4 * m * n * k)
  return out.reshape(*lead, n)


def matmul(x, w, *, bias=None, activation=None, residual=None, out_dtype=None,
           interpret: bool = False, config: MatmulConfig | None = None):
  """x [..., K] @ w [K, N] with the epilogue fused; arguments already checked by api.py."""
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  fn = functools.partial(_matmul, activation=activation, out_dtype=out_dtype,
                         interpret=interpret, config=config)
  return _fold_vmap_into_rows(fn, num_row_args=2)(x, residual, w, bias)


def gated_matmul(x, w_gate, w_up, *, activation="silu", interpret: bool = False,
                 config: MatmulConfig | None = None):
  """act(x @ w_gate) * (x @ w_up) in one pass over x; arguments already checked by api.py."""
  fn = functools.partial(_gated_matmul, activation=activation, interpret=interpret,
                         config=config)
  return _fold_vmap_into_rows(fn, num_row_args=1)(x, w_gate, w_up)
