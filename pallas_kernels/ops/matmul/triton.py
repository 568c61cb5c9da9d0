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

Gradients: a `jax.custom_vjp` wraps the folded forward (custom_vjp outside, custom_vmap
inside, so grad, vmap and their compositions all work). With an activation the forward
launch also stores the pre-activation (gated: both products); the backward forms dz = g *
act'(z) in one XLA fusion, then runs dx = dz @ w.T and dw = x.T @ dz on the same tiled
kernel (`_dot_kernel`), reading w and x in place with the transpose done per tile in the
kernel (`trans_w`, `trans_x`), never as an HBM copy. See bench/notes/matmul.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


def _operand_tile(ref, outer, inner, outer_mask, inner_mask, shape, transposed: bool):
  """`ref[outer, inner]` as a `shape` tile; when `transposed`, the operand is stored the other
  way round and this is `ref[inner, outer].T`: the transpose happens in registers/shared
  memory (Triton folds it into the dot's operand layout), never as an HBM copy."""
  if not transposed:
    return _load(ref.at[outer, inner], _tile_mask(outer_mask, inner_mask, shape))
  stored = (shape[1], shape[0])
  return _load(ref.at[inner, outer], _tile_mask(inner_mask, outer_mask, stored)).T


def _accumulate(products, row0, col0, row_mask, col_mask, *, k: int, block_m: int,
                block_n: int, block_k: int, precision, trans_x: bool = False,
                trans_w: bool = False):
  """fp32 `[block_m, block_n]` accumulators; accumulator i sums `x @ w` over the (x_ref, w_ref)
  pairs of `products[i]`, along K.

  Each distinct ref's tile is loaded once per K step: the gated matmul's two accumulators
  share the x tile, and so do the gated backward's dw_gate and dw_up (x.T). `trans_x`: x refs
  are stored [K, M] (the product takes x.T); `trans_w`: w refs are stored [N, K].
  """
  rows = pl.ds(row0, block_m)
  cols = pl.ds(col0, block_n)

  def body(step, accs):
    k0 = step * block_k
    ks = pl.ds(k0, block_k)
    k_mask = _span_mask(k0, block_k, k)
    tiles = {}

    def tile(ref, *where):
      if id(ref) not in tiles:
        tiles[id(ref)] = _operand_tile(ref, *where)
      return tiles[id(ref)]
    new = []
    for acc, pairs in zip(accs, products):
      for x_ref, w_ref in pairs:
        x = tile(x_ref, rows, ks, row_mask, k_mask, (block_m, block_k), trans_x)
        w = tile(w_ref, ks, cols, k_mask, col_mask, (block_k, block_n), trans_w)
        acc = acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)
      new.append(acc)
    return tuple(new)

  zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in products)
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
                   activation: str | None, has_bias: bool, has_residual: bool, precision,
                   save_preact: bool = False):
  # x_ref [m, k], w_ref [k, n], bias_ref [n], residual_ref [m, n], o_ref [m, n],
  # z_ref [m, n] (the pre-activation x @ w + bias, saved for the backward)
  refs = list(refs)
  bias_ref = refs.pop(0) if has_bias else None
  residual_ref = refs.pop(0) if has_residual else None
  o_ref = refs.pop(0)
  z_ref = refs.pop(0) if save_preact else None
  row0, col0, row_mask, col_mask = _tile_setup(m, n, cfg)
  (y,) = _accumulate((((x_ref, w_ref),),), row0, col0, row_mask, col_mask, k=k,
                     block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                     precision=precision)
  rows, cols = pl.ds(row0, cfg.block_m), pl.ds(col0, cfg.block_n)
  out_mask = _tile_mask(row_mask, col_mask, (cfg.block_m, cfg.block_n))
  if bias_ref is not None:
    y += _load(bias_ref.at[cols], col_mask).astype(jnp.float32)[None, :]  # [block_n]
  if z_ref is not None:
    plt.store(z_ref.at[rows, cols], y.astype(z_ref.dtype), mask=out_mask)
  y = _activate(y, activation)
  if residual_ref is not None:
    y += _load(residual_ref.at[rows, cols], out_mask).astype(jnp.float32)  # [block_m, block_n]
  plt.store(o_ref.at[rows, cols], y.astype(o_ref.dtype), mask=out_mask)


def _gated_kernel(x_ref, w_gate_ref, w_up_ref, o_ref, *saved_refs, m: int, n: int, k: int,
                  cfg: MatmulConfig, activation: str | None, precision):
  # x_ref [m, k], w_gate_ref [k, n], w_up_ref [k, n], o_ref [m, n];
  # saved_refs: none, or (gate_ref, up_ref) [m, n], the two products saved for the backward
  row0, col0, row_mask, col_mask = _tile_setup(m, n, cfg)
  gate, up = _accumulate((((x_ref, w_gate_ref),), ((x_ref, w_up_ref),)), row0, col0, row_mask,
                         col_mask, k=k, block_m=cfg.block_m, block_n=cfg.block_n,
                         block_k=cfg.block_k, precision=precision)
  out_mask = _tile_mask(row_mask, col_mask, (cfg.block_m, cfg.block_n))
  tile = (pl.ds(row0, cfg.block_m), pl.ds(col0, cfg.block_n))
  for ref, value in zip(saved_refs, (gate, up)):
    plt.store(ref.at[tile], value.astype(ref.dtype), mask=out_mask)
  y = _activate(gate, activation) * up
  plt.store(o_ref.at[tile], y.astype(o_ref.dtype), mask=out_mask)


def _dot_kernel(*refs, products, num_inputs: int, m: int, n: int, k: int, cfg: MatmulConfig,
                trans_x: bool, trans_w: bool, precision):
  """The backward products: output i = sum over products[i] of x @ w (no epilogue).

  refs: `num_inputs` operand refs, then one [m, n] output ref per entry of `products`,
  which holds (x index, w index) pairs into the operands. Operands are [m, k] / [k, n], or
  [k, m] / [n, k] when `trans_x` / `trans_w`.
  """
  ins, outs = refs[:num_inputs], refs[num_inputs:]
  row0, col0, row_mask, col_mask = _tile_setup(m, n, cfg)
  pairs = tuple(tuple((ins[a], ins[b]) for a, b in product) for product in products)
  accs = _accumulate(pairs, row0, col0, row_mask, col_mask, k=k, block_m=cfg.block_m,
                     block_n=cfg.block_n, block_k=cfg.block_k, precision=precision,
                     trans_x=trans_x, trans_w=trans_w)
  out_mask = _tile_mask(row_mask, col_mask, (cfg.block_m, cfg.block_n))
  tile = (pl.ds(row0, cfg.block_m), pl.ds(col0, cfg.block_n))
  for acc, o_ref in zip(accs, outs):
    plt.store(o_ref.at[tile], acc.astype(o_ref.dtype), mask=out_mask)


def _precision(dtype):
  # fp32 inputs: full-precision FMA dots (the default would be TF32, ~1e-3 relative error).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


@functools.partial(jax.jit, static_argnames=("body", "params", "name", "mnk", "out_dtypes", "cfg",
                                             "interpret", "flops"))
def _launch(*operands, body, params: tuple, name: str, mnk: tuple[int, int, int], out_dtypes,
            cfg: MatmulConfig, interpret: bool, flops: int) -> list:
  """One launch of kernel `body(*refs, **params, m=, n=, k=, cfg=)` over the [m, n] output
  tiles; one [m, n] output per entry of `out_dtypes`.

  Jitted on hashable static arguments (the config is resolved by the caller, outside), so an
  eager or repeated call with the same shapes reuses the compiled launch.
  """
  m, n, k = mnk
  kernel = functools.partial(body, **dict(params), m=m, n=n, k=k, cfg=cfg)
  grid = (pl.cdiv(m, cfg.block_m) * pl.cdiv(n, cfg.block_n),)
  bytes_accessed = sum(a.size * a.dtype.itemsize for a in operands)
  bytes_accessed += sum(m * n * jnp.dtype(d).itemsize for d in out_dtypes)
  return pl.pallas_call(
      kernel, out_shape=[jax.ShapeDtypeStruct((m, n), d) for d in out_dtypes], grid=grid,
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
      out = jax.vmap(fn, in_axes=in_axes)(*args)
    else:
      rows = [a if a is None or batched else jnp.broadcast_to(a, (axis_size, *a.shape))
              for a, batched in zip(args[:num_row_args], in_batched)]
      out = folded(*rows, *args[num_row_args:])
    return out, jax.tree.map(lambda _: True, out)

  return folded


def _matmul(x, residual, w, bias, *, activation, out_dtype, interpret, config,
            save_preact: bool = False):
  """The forward launch; with `save_preact`, (out, z): z = x @ w + bias in x.dtype."""
  *lead, k = x.shape
  n = w.shape[1]
  m = math.prod(lead)
  if m == 0 or n == 0 or k == 0:  # nothing to tile; the reference handles empty shapes
    out = reference.matmul(x, w, bias=bias, activation=activation, residual=residual,
                           out_dtype=out_dtype)
    return (out, jnp.zeros(out.shape, x.dtype)) if save_preact else out
  cfg = config_lib.resolve(config, m, n, k, x.dtype, gated=False)
  operands = [x.reshape(m, k), w]
  if bias is not None:
    operands.append(bias)
  if residual is not None:
    operands.append(residual.reshape(m, n))
  params = (("activation", activation), ("has_bias", bias is not None),
            ("has_residual", residual is not None), ("precision", _precision(x.dtype)),
            ("save_preact", save_preact))
  outs = _launch(*operands, body=_matmul_kernel, params=params,
                 name="matmul_preact" if save_preact else "matmul", mnk=(m, n, k),
                 out_dtypes=(out_dtype,) + (x.dtype,) * save_preact, cfg=cfg,
                 interpret=interpret, flops=2 * m * n * k)
  outs = tuple(o.reshape(*lead, n) for o in outs)
  return outs if save_preact else outs[0]


def _gated_matmul(x, w_gate, w_up, *, activation, interpret, config, save_preact: bool = False):
  """The forward launch; with `save_preact`, (out, x @ w_gate, x @ w_up), all in x.dtype."""
  *lead, k = x.shape
  n = w_gate.shape[1]
  m = math.prod(lead)
  if m == 0 or n == 0 or k == 0:
    out = reference.gated_matmul(x, w_gate, w_up, activation=activation)
    return (out, jnp.zeros_like(out), jnp.zeros_like(out)) if save_preact else out
  cfg = config_lib.resolve(config, m, n, k, x.dtype, gated=True)
  params = (("activation", activation), ("precision", _precision(x.dtype)))
  outs = _launch(x.reshape(m, k), w_gate, w_up, body=_gated_kernel, params=params,
                 name="gated_matmul_preact" if save_preact else "gated_matmul", mnk=(m, n, k),
                 out_dtypes=(x.dtype,) * (1 + 2 * save_preact), cfg=cfg, interpret=interpret,
                 flops=4 * m * n * k)
  outs = tuple(o.reshape(*lead, n) for o in outs)
  return outs if save_preact else outs[0]


# ---- backward: dx = dz @ w.T and dw = x.T @ dz on the same tiled kernel ------------------

def _dx(*args, interpret: bool):
  """dz [..., N] @ w [K, N].T -> [..., K], summed over (dz, w) pairs: `_dx(dz, w)` or, for the
  gated matmul, `_dx(d_gate, d_up, w_gate, w_up)` (one accumulator, both products).

  w is read in place, transposed per tile (`trans_w`): no [N, K] copy of the weights.
  """
  pairs = len(args) // 2
  dzs, ws = args[:pairs], args[pairs:]
  *lead, n = dzs[0].shape
  k = ws[0].shape[0]
  m = math.prod(lead)
  dtype = dzs[0].dtype
  cfg = config_lib.resolve(None, m, k, n, dtype, gated=pairs == 2, variant="dx", lhs=pairs,
                           rhs=pairs)
  params = (("products", (tuple((i, pairs + i) for i in range(pairs)),)),
            ("num_inputs", 2 * pairs), ("trans_x", False), ("trans_w", True),
            ("precision", _precision(dtype)))
  (dx,) = _launch(*(dz.reshape(m, n) for dz in dzs), *ws, body=_dot_kernel, params=params,
                  name="gated_matmul_dx" if pairs == 2 else "matmul_dx", mnk=(m, k, n),
                  out_dtypes=(dtype,), cfg=cfg, interpret=interpret,
                  flops=2 * pairs * m * n * k)
  return dx.reshape(*lead, k)


def _dw(x, *dzs, interpret: bool):
  """x [..., K].T @ dz [..., N] -> [K, N] for each dz, in one launch: the x.T tile of each
  M step feeds every product (dw_gate and dw_up of the gated matmul).

  x is read in place, transposed per tile (`trans_x`): no [K, M] copy of the activations.
  """
  *lead, k = x.shape
  n = dzs[0].shape[-1]
  m = math.prod(lead)
  cfg = config_lib.resolve(None, k, n, m, x.dtype, gated=len(dzs) == 2, variant="dw")
  params = (("products", tuple(((0, 1 + i),) for i in range(len(dzs)))),
            ("num_inputs", 1 + len(dzs)), ("trans_x", True), ("trans_w", False),
            ("precision", _precision(x.dtype)))
  return tuple(_launch(x.reshape(m, k), *(dz.reshape(m, n) for dz in dzs), body=_dot_kernel,
                       params=params, name="gated_matmul_dw" if len(dzs) == 2 else "matmul_dw",
                       mnk=(k, n, m), out_dtypes=(x.dtype,) * len(dzs), cfg=cfg,
                       interpret=interpret, flops=2 * len(dzs) * m * n * k))


def _activation_vjp(z, activation: str | None, cotangent):
  """(act(z), d act(z) * cotangent) in fp32, through XLA's autodiff of the reference."""
  value, pullback = jax.vjp(functools.partial(reference.activate, activation=activation),
                            z.astype(jnp.float32))
  return value, pullback(cotangent)[0]


class _MatmulStatic(NamedTuple):
  activation: str | None
  out_dtype: jnp.dtype
  interpret: bool
  config: MatmulConfig | None
  has_bias: bool
  has_residual: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul_diff(x, residual, w, bias, static: _MatmulStatic):
  fn = functools.partial(_matmul, activation=static.activation, out_dtype=static.out_dtype,
                         interpret=static.interpret, config=static.config)
  return _fold_vmap_into_rows(fn, num_row_args=2)(x, residual, w, bias)


def _matmul_diff_fwd(x, residual, w, bias, static: _MatmulStatic):
  if static.activation is None:  # d(out)/d(z) is the identity: nothing to save
    out, z = _matmul_diff(x, residual, w, bias, static), None
  else:
    fn = functools.partial(_matmul, activation=static.activation, out_dtype=static.out_dtype,
                           interpret=static.interpret, config=static.config, save_preact=True)
    out, z = _fold_vmap_into_rows(fn, num_row_args=2)(x, residual, w, bias)
  return out, (x, w, z)


def _matmul_diff_bwd(static: _MatmulStatic, saved, g):
  x, w, z = saved
  # dz = g * act'(z) in fp32 (XLA: one elementwise fusion with the dbias reduction), rounded
  # once to x.dtype, the operand dtype of the tensor-core products.
  dz32 = g.astype(jnp.float32)
  if z is not None:
    _, dz32 = _activation_vjp(z, static.activation, dz32)
  dbias = None
  if static.has_bias:
    dbias = jnp.sum(dz32.reshape(-1, dz32.shape[-1]), axis=0).astype(x.dtype)
  dresidual = g.astype(x.dtype) if static.has_residual else None
  dz = g if z is None and g.dtype == x.dtype else dz32.astype(x.dtype)
  dx = _fold_vmap_into_rows(functools.partial(_dx, interpret=static.interpret), 1)(dz, w)
  (dw,) = _dw(x, dz, interpret=static.interpret)
  return dx, dresidual, dw, dbias


_matmul_diff.defvjp(_matmul_diff_fwd, _matmul_diff_bwd)


class _GatedStatic(NamedTuple):
  activation: str | None
  interpret: bool
  config: MatmulConfig | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gated_diff(x, w_gate, w_up, static: _GatedStatic):
  fn = functools.partial(_gated_matmul, activation=static.activation,
                         interpret=static.interpret, config=static.config)
  return _fold_vmap_into_rows(fn, num_row_args=1)(x, w_gate, w_up)


def _gated_diff_fwd(x, w_gate, w_up, static: _GatedStatic):
  fn = functools.partial(_gated_matmul, activation=static.activation,
                         interpret=static.interpret, config=static.config, save_preact=True)
  out, gate, up = _fold_vmap_into_rows(fn, num_row_args=1)(x, w_gate, w_up)
  return out, (x, w_gate, w_up, gate, up)


def _gated_diff_bwd(static: _GatedStatic, saved, g):
  x, w_gate, w_up, gate, up = saved
  g = g.astype(jnp.float32)
  act_gate, d_gate = _activation_vjp(gate, static.activation, g * up.astype(jnp.float32))
  d_up = (g * act_gate).astype(x.dtype)
  d_gate = d_gate.astype(x.dtype)
  dx = _fold_vmap_into_rows(functools.partial(_dx, interpret=static.interpret), 2)(
      d_gate, d_up, w_gate, w_up)
  dw_gate, dw_up = _dw(x, d_gate, d_up, interpret=static.interpret)
  return dx, dw_gate, dw_up


_gated_diff.defvjp(_gated_diff_fwd, _gated_diff_bwd)


def _empty(x, w) -> bool:
  return x.size == 0 or w.size == 0


def matmul(x, w, *, bias=None, activation=None, residual=None, out_dtype=None,
           interpret: bool = False, config: MatmulConfig | None = None):
  """x [..., K] @ w [K, N] with the epilogue fused; arguments already checked by api.py.

  Differentiable (custom_vjp): the forward saves the pre-activation when there is an
  activation; the backward runs dx and dw on the tiled kernel (see `_dx`, `_dw`).
  """
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  if _empty(x, w):  # nothing to tile: the reference, differentiated by jax
    return reference.matmul(x, w, bias=bias, activation=activation, residual=residual,
                            out_dtype=out_dtype)
  static = _MatmulStatic(activation, out_dtype, interpret, config, bias is not None,
                         residual is not None)
  return _matmul_diff(x, residual, w, bias, static)


def gated_matmul(x, w_gate, w_up, *, activation="silu", interpret: bool = False,
                 config: MatmulConfig | None = None):
  """act(x @ w_gate) * (x @ w_up) in one pass over x; arguments already checked by api.py.

  Differentiable (custom_vjp): the forward saves both products; the backward runs one dx
  launch (both products into one accumulator) and one dw launch (both weight gradients).
  """
  if _empty(x, w_gate):
    return reference.gated_matmul(x, w_gate, w_up, activation=activation)
  return _gated_diff(x, w_gate, w_up, _GatedStatic(activation, interpret, config))
