"""Warp-specialised Hopper matmul and gated matmul in Pallas Mosaic GPU (`impl="mosaic"`).

A persistent grid (one program per SM) walks the `[block_m, block_n]` output tiles (program p
takes tiles p, p + P, ...) with three warpgroups (CUTLASS's "cooperative" warp-specialised
kernel, FA3's producer/consumer split):
  producer (2)       TMA-streams the `[block_m, block_k]` x tile and the `[block_k, block_n]`
                     weight tile(s) of each K step into a ring of `num_stages` SMEM slots;
                     per slot a "loaded" barrier (TMA transaction count, one arrival per copy)
                     and a "consumed" barrier (one arrival per consumer). Registers lowered to 40.
                     The ring runs on across tiles: the next tile's loads start under the
                     consumers' epilogue of this one.
  consumers 0 and 1  each own `block_m // 2` rows of the tile (the wgmma M: 64 or 128) and
                     issue `wgmma` into fp32 accumulators (one per weight: the gated matmul's
                     gate and up products share the x tile). One K step's wgmmas stay in flight
                     while the next is issued; a slot is released once the wgmmas reading it
                     have retired. Registers raised to 232.
Tile indices map to tiles in grouped order (`triton._grouped_tile`: `group_m` tile rows walked
together), so the tiles in flight at one time share x row stripes and w column stripes in L2.

Epilogue in registers, on the fp32 accumulator, as the Triton kernel (`triton._activate`, the
same activation code): + bias, activation, + residual, one rounding; then through a per-consumer
SMEM tile to a TMA store. The bias slice and the residual tile are TMA-prefetched into SMEM
when a consumer starts a tile, so their loads hide under the K loop; the residual shares the
output's SMEM tile when their dtypes match.

Ragged tiles need no padding: TMA reads past an array's end return zeros and TMA writes past it
are dropped (the last row tile, the last column tile). But Mosaic's TMA lowering (jax 0.11.2)
needs whole 64-column swizzled tiles along K and N (multiples of 64, refused otherwise) and rows
in multiples of 8 when M > 8 (else padded, one copy: `_tma_rows`).

Gradients: `jax.custom_vjp` with the Triton backward (`triton._matmul_diff_bwd`,
`triton._gated_diff_bwd`), exactly as `triton.matmul` runs it: the forward saves the
pre-activation (gated: both products), which this kernel writes through the same SMEM tile.
vmap folds a batch axis into the rows (`triton._fold_vmap_into_rows`). See bench/notes/matmul.md,
"Hopper path (Mosaic GPU), v1".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._core import device
from pallas_kernels.ops.matmul import reference
from pallas_kernels.ops.matmul import triton as triton_impl

NUM_CONSUMERS = 2  # consumer warpgroups per program, splitting the tile's rows
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# K and N: multiples of the swizzled SMEM tile's 64 columns. Mosaic's TMA lowering (jax 0.11.2)
# requires a tiled GMEM dimension to be a multiple of its tile (or smaller than it, which the
# 128-byte swizzle of the wgmma operands does not allow for N and K).
ALIGN = 64
SMEM_LIMIT_BYTES = 227 * 1024  # H100 / H200: 232,448 B of shared memory a block
MAX_STAGES = 6
HOPPER_SMS = 132  # H100 SXM / H200: one wave of one-program-per-SM tiles
_SWIZZLE_BYTES = 128  # the widest wgmma swizzle: 64 two-byte elements a row
_CONSUMER_REGISTERS, _PRODUCER_REGISTERS = 232, 40  # (2 x 232 + 40) x 128 threads <= 64 K


@dataclasses.dataclass(frozen=True)
class MosaicMatmulConfig:
  """Tiles of the Mosaic kernel: two consumer warpgroups of `block_m // 2` rows each."""

  block_m: int = 128    # 128 or 256: consumer rows (wgmma M) of 64 or 128
  block_n: int = 128    # multiple of 64 in [64, 256]: the wgmma N, 128-byte swizzled w rows
  block_k: int = 64     # 32 or 64: one 64- or 128-byte swizzled x row per K step
  num_stages: int = 4   # SMEM ring slots (K steps in flight)
  group_m: int = 8      # tile rows walked together by the grouped (L2-friendly) order
  num_programs: int | None = None  # persistent grid size; None: one program per SM

  def __post_init__(self):
    for name in dataclasses.fields(self):
      value = getattr(self, name.name)
      if name.name == "num_programs" and value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MosaicMatmulConfig: `{name.name}` expected an int, got {value!r}")
    if self.block_m not in (128, 256):
      raise ValueError(f"MosaicMatmulConfig: `block_m` expected 128 or 256 (two consumers of "
                       f"wgmma M 64 or 128), got {self.block_m}")
    if self.block_n % 64 or not 64 <= self.block_n <= 256:
      raise ValueError(f"MosaicMatmulConfig: `block_n` expected a multiple of 64 in [64, 256] "
                       f"(wgmma N, 128-byte swizzle), got {self.block_n}")
    if self.block_k not in (32, 64):
      raise ValueError(f"MosaicMatmulConfig: `block_k` expected 32 or 64, got {self.block_k}")
    if not 2 <= self.num_stages <= MAX_STAGES:
      raise ValueError(f"MosaicMatmulConfig: `num_stages` expected an int in [2, {MAX_STAGES}], "
                       f"got {self.num_stages}")
    for name in ("group_m", "num_programs"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"MosaicMatmulConfig: `{name}` expected a positive int, "
                         f"got {getattr(self, name)}")


def shared_memory_bytes(cfg: MosaicMatmulConfig, dtype, *, out_dtype=None, weights: int = 1,
                        bias: bool = False, residual: bool = False) -> int:
  """The ring (x tile + one tile per weight, per stage), the output tile of both consumers,
  a separate x.dtype staging tile when out_dtype differs (residual or saved pre-activation),
  the bias slices and the barriers. The CUDA lowering's own figure is within a few hundred
  bytes (alignment); a test holds it to that."""
  item = jnp.dtype(dtype).itemsize
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  out_item = out_dtype.itemsize
  ring = cfg.num_stages * (cfg.block_m * cfg.block_k + weights * cfg.block_k * cfg.block_n) * item
  out = cfg.block_m * cfg.block_n * out_item
  aux = cfg.block_m * cfg.block_n * item if residual and out_dtype != jnp.dtype(dtype) else 0
  vec = NUM_CONSUMERS * cfg.block_n * item if bias else 0
  barriers = 8 * (2 * cfg.num_stages + NUM_CONSUMERS * (bias or residual))
  return ring + out + aux + vec + barriers


def accumulator_registers(cfg: MosaicMatmulConfig, weights: int = 1) -> int:
  """fp32 accumulator registers a consumer thread holds (128 threads a warpgroup)."""
  return weights * (cfg.block_m // NUM_CONSUMERS) * cfg.block_n // 128


def heuristic(m: int, n: int, k: int, dtype, *, gated: bool = False, out_dtype=None,
              bias: bool = False, residual: bool = False) -> MosaicMatmulConfig:
  """128x256x64 (CUTLASS's Hopper bf16 tile: 128 accumulator registers a consumer thread)
  when that still gives at least one full wave of programs (`HOPPER_SMS`); else 128x128x64:
  small M (decode, M = 512 prefill: more programs over the weights beat wider tiles) and the
  gated matmul (two accumulators). Then as many stages as fit 227 KB, at most 4."""
  del k
  wide_tiles = pl.cdiv(m, 128) * pl.cdiv(n, 256)
  block_n = 256 if not gated and n > 128 and wide_tiles >= HOPPER_SMS else 128
  weights = 2 if gated else 1
  for stages in range(4, 1, -1):
    cfg = MosaicMatmulConfig(128, block_n, 64, stages)
    if shared_memory_bytes(cfg, dtype, out_dtype=out_dtype, weights=weights, bias=bias,
                           residual=residual) <= SMEM_LIMIT_BYTES:
      return cfg
  return MosaicMatmulConfig(128, 128, 64, 2)


def _refuse_common(x, w, config) -> str | None:
  if jnp.dtype(x.dtype) not in DTYPES:
    return (f"impl='mosaic' supports bfloat16/float16 (wgmma reads 2-byte tiles from SMEM), "
            f"got {jnp.dtype(x.dtype).name}; use impl='triton' for float32")
  k, n = x.shape[-1], w.shape[-1]
  if k % ALIGN or n % ALIGN:
    return (f"impl='mosaic' needs K and N multiples of {ALIGN} (the TMA lowering needs whole "
            f"64-column swizzled tiles), got K={k}, N={n}; use impl='triton'")
  if config is not None and not isinstance(config, MosaicMatmulConfig):
    return (f"impl='mosaic' takes config=MosaicMatmulConfig or None, "
            f"got {type(config).__name__}")
  return None


def refuses(x, w, *, config=None, **kwargs) -> str | None:
  """Why impl="mosaic" cannot run this matmul call, or None."""
  del kwargs
  return _refuse_common(x, w, config)


def gated_refuses(x, w_gate, w_up, *, config=None, **kwargs) -> str | None:
  """Why impl="mosaic" cannot run this gated_matmul call, or None."""
  del w_up, kwargs
  return _refuse_common(x, w_gate, config)


# ---- the kernel ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
  """Static facts of one launch that the kernel body needs."""

  m: int
  n: int
  k: int
  cfg: MosaicMatmulConfig
  weights: int               # 1 (matmul) or 2 (gated: w_gate, w_up)
  activation: str | None
  has_bias: bool
  has_residual: bool
  save_preact: bool          # also write the pre-activation(s) (for the backward)
  num_programs: int          # the persistent grid: programs loop over tiles pid, pid + P, ...

  @property
  def grid_mn(self) -> tuple[int, int]:
    return pl.cdiv(self.m, self.cfg.block_m), pl.cdiv(self.n, self.cfg.block_n)

  @property
  def num_tiles(self) -> int:
    return self.grid_mn[0] * self.grid_mn[1]

  @property
  def rows(self) -> int:     # rows per consumer: the wgmma M
    return self.cfg.block_m // NUM_CONSUMERS

  @property
  def k_steps(self) -> int:
    return pl.cdiv(self.k, self.cfg.block_k)


def _kernel(*refs, s: _Static):
  # x_ref [m, k];  w_refs: weights x [k, n];  bias_ref [n];  residual_ref [m, n];
  # out_refs: o [m, n], then the saved pre-activations [m, n] (matmul: z; gated: gate, up)
  # x_smem [stages, block_m, block_k];  w_smems: weights x [stages, block_k, block_n]
  # o_smem [2, rows, block_n] (out dtype);  aux_smem [2, rows, block_n] (x dtype) or o_smem
  # bias_smem [2, block_n] or None
  refs = list(refs)
  x_ref, w_refs = refs.pop(0), [refs.pop(0) for _ in range(s.weights)]
  bias_ref = refs.pop(0) if s.has_bias else None
  residual_ref = refs.pop(0) if s.has_residual else None
  out_refs = [refs.pop(0) for _ in range(1 + s.save_preact * s.weights)]
  smem, barriers = refs
  cfg = s.cfg
  pid = lax.axis_index("programs")
  wg = lax.axis_index("wg")

  def tiles(body):
    """Run body(row0, col0, first_step) for this program's tiles, in grouped order; first_step
    counts the K steps this program has put through the ring before the tile."""
    @pl.loop(pid, s.num_tiles, step=s.num_programs)
    def _(tile):
      tile_m, tile_n = triton_impl._grouped_tile(tile, grid_m=s.grid_mn[0],
                                                 grid_n=s.grid_mn[1], group_m=cfg.group_m)
      first_step = lax.div(tile - pid, jnp.int32(s.num_programs)) * s.k_steps
      body(tile_m * cfg.block_m, tile_n * cfg.block_n, first_step)

  @pl.when(wg < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    tiles(functools.partial(_consume, s, bias_ref, residual_ref, out_refs, smem, barriers, wg))
    plgpu.wait_smem_to_gmem(0)  # the last tile's stores have landed

  @pl.when(wg == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    tiles(lambda row0, col0, first_step: _produce(
        s, x_ref.at[pl.ds(row0, cfg.block_m)],
        [w.at[:, pl.ds(col0, cfg.block_n)] for w in w_refs], smem, barriers, first_step))
    # Observe the last releases: every waiter must see every barrier phase (the interpreter
    # checks), and it keeps the parity bookkeeping exact.
    steps = pl.cdiv(s.num_tiles - pid, jnp.int32(s.num_programs)) * s.k_steps
    consumed = barriers[1]

    @pl.loop(jnp.maximum(steps - cfg.num_stages, 0), steps)
    def _(step):
      plgpu.barrier_wait(consumed.at[lax.rem(step, jnp.int32(cfg.num_stages))])


def _produce(s: _Static, x_ref, w_refs, smem, barriers, first_step):
  """TMA one tile's x and weight K steps into the ring; a slot is refilled once both consumers
  have released it. Ring step = first_step + j: the next tile's loads start as soon as slots
  free up, under the consumers' epilogue of this one."""
  # x_ref [block_m, k] (this tile's rows);  w_refs: [k, block_n] (this tile's columns)
  x_smem, w_smems = smem[0], smem[1]
  loaded, consumed = barriers[0], barriers[1]
  stages, block_k = s.cfg.num_stages, s.cfg.block_k

  @pl.loop(0, s.k_steps)
  def _(j):
    step = first_step + j
    slot = lax.rem(step, jnp.int32(stages))

    @pl.when(step >= stages)
    def _():
      plgpu.barrier_wait(consumed.at[slot])
    ks = pl.ds(j * block_k, block_k)
    plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[slot], loaded.at[slot])
    for w_ref, w_smem in zip(w_refs, w_smems):
      plgpu.copy_gmem_to_smem(w_ref.at[ks], w_smem.at[slot], loaded.at[slot])


def _mainloop(s: _Static, x_smem, w_smems, loaded, consumed, wg, first_step):
  """This consumer's K loop over ring steps first_step.. : fp32 accumulators [rows, block_n],
  one per weight."""
  rows = pl.ds(wg * s.rows, s.rows)
  stages = s.cfg.num_stages

  def slot_of(j):
    return lax.rem(first_step + j, jnp.int32(stages))

  def scope(*acc_refs):
    def step(j, carry):
      slot = slot_of(j)
      plgpu.barrier_wait(loaded.at[slot])
      for acc_ref, w_smem in zip(acc_refs, w_smems):
        plgpu.wgmma(acc_ref, x_smem.at[slot, rows], w_smem.at[slot])
      # This step's wgmmas stay in flight; the previous step's have retired: release its slot.
      plgpu.wgmma_wait(len(acc_refs))

      @pl.when(j > 0)
      def _():
        plgpu.barrier_arrive(consumed.at[slot_of(j - 1)])
      return carry
    lax.fori_loop(0, s.k_steps, step, None)
    plgpu.wgmma_wait(0)
    plgpu.barrier_arrive(consumed.at[slot_of(s.k_steps - 1)])
    return tuple(acc_ref[...] for acc_ref in acc_refs)

  acc = plgpu.ACC((s.rows, s.cfg.block_n), jnp.float32)
  return pl.run_scoped(scope, *([acc] * s.weights))


def _store(staging, out_ref, value):
  """value -> SMEM staging tile -> TMA store; returns once the store has read the staging tile
  (the next use of the tile, or the next tile's residual prefetch, may overwrite it)."""
  staging[...] = value.astype(staging.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(staging, out_ref)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _consume(s: _Static, bias_ref, residual_ref, out_refs, smem, barriers, wg, row0, col0,
             first_step):
  """One tile for this consumer: prefetch the epilogue operands, the K loop, the epilogue."""
  x_smem, w_smems, o_smem, aux_smem, bias_smem = smem
  loaded, consumed, epi_loaded = barriers
  block_n = s.cfg.block_n
  my_rows = pl.ds(row0 + wg * s.rows, s.rows)
  cols = pl.ds(col0, block_n)
  # Prefetch the epilogue operands: they land while the K loop runs.
  if bias_ref is not None:
    plgpu.copy_gmem_to_smem(bias_ref.at[cols], bias_smem.at[wg], epi_loaded.at[wg])
  if residual_ref is not None:
    plgpu.copy_gmem_to_smem(residual_ref.at[my_rows, cols], aux_smem.at[wg], epi_loaded.at[wg])
  accs = _mainloop(s, x_smem, w_smems, loaded, consumed, wg, first_step)
  if epi_loaded is not None:
    plgpu.barrier_wait(epi_loaded.at[wg])
  outs = [o.at[my_rows, cols] for o in out_refs]
  o_tile, aux_tile = o_smem.at[wg], aux_smem.at[wg]
  if s.weights == 2:  # gated: act(gate) * up
    gate, up = accs
    if s.save_preact:
      _store(aux_tile, outs[1], gate)
      _store(aux_tile, outs[2], up)
    _store(o_tile, outs[0], triton_impl._activate(gate, s.activation) * up)
    return
  (y,) = accs
  if bias_ref is not None:
    bias = plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))  # [block_n]
    y = y + lax.broadcast_in_dim(bias.astype(jnp.float32), y.shape, [1])
  residual = None
  if residual_ref is not None:  # read before the staging tile (maybe shared) is overwritten
    residual = aux_tile[...].astype(jnp.float32)  # [rows, block_n]
  if s.save_preact:
    _store(aux_tile, outs[1], y)
  y = triton_impl._activate(y, s.activation)
  if residual is not None:
    y = y + residual
  _store(o_tile, outs[0], y)


def _smem(shape, dtype):
  """SMEM in the layout wgmma and the swizzled TMA want: (8, 128 B) tiles, 128-byte swizzle."""
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
      plgpu.SwizzleTransform(_SWIZZLE_BYTES)))


def _x_smem(cfg: MosaicMatmulConfig, dtype):
  """x tiles [stages, block_m, block_k]: one swizzled row of block_k elements (64 or 128 B)."""
  swizzle = cfg.block_k * jnp.dtype(dtype).itemsize
  return plgpu.SMEM((cfg.num_stages, cfg.block_m, cfg.block_k), dtype, transforms=(
      plgpu.TilingTransform((8, cfg.block_k)), plgpu.SwizzleTransform(swizzle)))


@functools.partial(jax.jit, static_argnames=("s", "out_dtype", "interpret"))
def _launch(*operands, s: _Static, out_dtype, interpret: bool):
  """One kernel launch over the [m, n] output tiles; operands as `_kernel` reads them."""
  cfg = s.cfg
  dtype = operands[0].dtype
  rows_shape = (NUM_CONSUMERS, s.rows, cfg.block_n)
  o_smem = _smem(rows_shape, out_dtype)
  needs_aux = s.has_residual or s.save_preact
  separate_aux = needs_aux and jnp.dtype(out_dtype) != jnp.dtype(dtype)
  aux_smem = _smem(rows_shape, dtype) if separate_aux else None
  epi_arrivals = s.has_bias + s.has_residual
  out_types = [jax.ShapeDtypeStruct((s.m, s.n), out_dtype)]
  out_types += [jax.ShapeDtypeStruct((s.m, s.n), dtype)] * (s.save_preact * s.weights)

  def body(*refs):
    *arrays, (x_smem, w_smems, o_buf, aux_buf, bias_smem), barriers = refs
    smem = (x_smem, w_smems, o_buf, o_buf if aux_buf is None else aux_buf, bias_smem)
    _kernel(*arrays, smem, barriers, s=s)

  kernel = plgpu.kernel(
      body,
      out_type=tuple(out_types),
      scratch_types=(
          (_x_smem(cfg, dtype),
           tuple(_smem((cfg.num_stages, cfg.block_k, cfg.block_n), dtype)
                 for _ in range(s.weights)),
           o_smem, aux_smem,
           plgpu.SMEM((NUM_CONSUMERS, cfg.block_n), dtype) if s.has_bias else None),
          (plgpu.Barrier(num_arrivals=1 + s.weights, num_barriers=cfg.num_stages),  # loaded
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=cfg.num_stages),  # consumed
           plgpu.Barrier(num_arrivals=epi_arrivals, num_barriers=NUM_CONSUMERS)
           if epi_arrivals else None),  # epi_loaded: bias / residual prefetch
      ),
      grid=(s.num_programs,),
      grid_names=("programs",),
      num_threads=NUM_CONSUMERS + 1,
      thread_name="wg",
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name=("gated_matmul" if s.weights == 2 else "matmul") + "_mosaic",
  )
  return kernel(*operands)


# ---- forward launches and the differentiable wrappers -----------------------------------------

def _tma_rows(m: int) -> int:
  """Rows the kernel sees: m itself, or m rounded up to a multiple of 8 when m > 8 is not one.

  Mosaic's TMA lowering (jax 0.11.2, `TileTransform.transform_gmem_shape`) requires every tiled
  GMEM dimension to be a multiple of its tile or smaller than it; the row tile is 8. Rows past m
  within a block need nothing (TMA zero-fills reads, drops writes), but M % 8 != 0 with M > 8
  costs one pad copy of x (and the residual) and a slice of the output. Engine buckets and
  decode batches <= 8 never pay it.
  """
  return m if m <= 8 or m % 8 == 0 else m + (-m) % 8


def _num_programs(cfg: MosaicMatmulConfig, m: int, n: int) -> int:
  """Persistent grid: one program per SM (or cfg.num_programs), never more than tiles."""
  tiles = pl.cdiv(m, cfg.block_m) * pl.cdiv(n, cfg.block_n)
  return min(tiles, cfg.num_programs or device.current_target().num_sms or HOPPER_SMS)


def _pad_rows(a, rows: int):
  return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _matmul(x, residual, w, bias, *, activation, out_dtype, interpret, config,
            save_preact: bool = False):
  """The forward launch; with `save_preact`, (out, z): z = x @ w + bias in x.dtype."""
  *lead, k = x.shape
  n = w.shape[1]
  m = math.prod(lead)
  if m == 0:  # nothing to tile
    out = reference.matmul(x, w, bias=bias, activation=activation, residual=residual,
                           out_dtype=out_dtype)
    return (out, jnp.zeros(out.shape, x.dtype)) if save_preact else out
  cfg = config or heuristic(m, n, k, x.dtype, out_dtype=out_dtype, bias=bias is not None,
                            residual=residual is not None or save_preact)
  rows = _tma_rows(m)
  s = _Static(m=rows, n=n, k=k, cfg=cfg, weights=1, activation=activation,
              has_bias=bias is not None, has_residual=residual is not None,
              save_preact=save_preact, num_programs=_num_programs(cfg, rows, n))
  operands = [_pad_rows(x.reshape(m, k), rows), w]
  operands += [] if bias is None else [bias]
  operands += [] if residual is None else [_pad_rows(residual.reshape(m, n), rows)]
  outs = _launch(*operands, s=s, out_dtype=out_dtype, interpret=interpret)
  outs = tuple(o[:m].reshape(*lead, n) for o in outs)
  return outs if save_preact else outs[0]


def _gated_matmul(x, w_gate, w_up, *, activation, interpret, config, save_preact: bool = False):
  """The forward launch; with `save_preact`, (out, x @ w_gate, x @ w_up), all in x.dtype."""
  *lead, k = x.shape
  n = w_gate.shape[1]
  m = math.prod(lead)
  if m == 0:
    out = reference.gated_matmul(x, w_gate, w_up, activation=activation)
    return (out, jnp.zeros_like(out), jnp.zeros_like(out)) if save_preact else out
  cfg = config or heuristic(m, n, k, x.dtype, gated=True)
  rows = _tma_rows(m)
  s = _Static(m=rows, n=n, k=k, cfg=cfg, weights=2, activation=activation, has_bias=False,
              has_residual=False, save_preact=save_preact,
              num_programs=_num_programs(cfg, rows, n))
  outs = _launch(_pad_rows(x.reshape(m, k), rows), w_gate, w_up, s=s, out_dtype=x.dtype,
                 interpret=interpret)
  outs = tuple(o[:m].reshape(*lead, n) for o in outs)
  return outs if save_preact else outs[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul_diff(x, residual, w, bias, static: triton_impl._MatmulStatic):
  fn = functools.partial(_matmul, activation=static.activation, out_dtype=static.out_dtype,
                         interpret=static.interpret, config=static.config)
  return triton_impl._fold_vmap_into_rows(fn, num_row_args=2)(x, residual, w, bias)


def _matmul_diff_fwd(x, residual, w, bias, static: triton_impl._MatmulStatic):
  """Saves (x, w, z) as `triton._matmul_diff_fwd` does: z only with an activation."""
  if static.activation is None:
    return _matmul_diff(x, residual, w, bias, static), (x, w, None)
  fn = functools.partial(_matmul, activation=static.activation, out_dtype=static.out_dtype,
                         interpret=static.interpret, config=static.config, save_preact=True)
  out, z = triton_impl._fold_vmap_into_rows(fn, num_row_args=2)(x, residual, w, bias)
  return out, (x, w, z)


_matmul_diff.defvjp(_matmul_diff_fwd, triton_impl._matmul_diff_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gated_diff(x, w_gate, w_up, static: triton_impl._GatedStatic):
  fn = functools.partial(_gated_matmul, activation=static.activation,
                         interpret=static.interpret, config=static.config)
  return triton_impl._fold_vmap_into_rows(fn, num_row_args=1)(x, w_gate, w_up)


def _gated_diff_fwd(x, w_gate, w_up, static: triton_impl._GatedStatic):
  """Saves (x, w_gate, w_up, gate, up) as `triton._gated_diff_fwd` does."""
  fn = functools.partial(_gated_matmul, activation=static.activation,
                         interpret=static.interpret, config=static.config, save_preact=True)
  out, gate, up = triton_impl._fold_vmap_into_rows(fn, num_row_args=1)(x, w_gate, w_up)
  return out, (x, w_gate, w_up, gate, up)


_gated_diff.defvjp(_gated_diff_fwd, triton_impl._gated_diff_bwd)


def matmul(x, w, *, bias=None, activation=None, residual=None, out_dtype=None,
           interpret: bool = False, config: MosaicMatmulConfig | None = None):
  """x [..., K] @ w [K, N] with the epilogue fused; checked by api.py and `refuses`.

  Differentiable: the Mosaic forward, the Triton backward (dx, dw kernels).
  """
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  if x.size == 0 or w.size == 0:  # nothing to tile: the reference, differentiated by jax
    return reference.matmul(x, w, bias=bias, activation=activation, residual=residual,
                            out_dtype=out_dtype)
  static = triton_impl._MatmulStatic(activation, out_dtype, interpret, config, bias is not None,
                                     residual is not None)
  return _matmul_diff(x, residual, w, bias, static)


def gated_matmul(x, w_gate, w_up, *, activation="silu", interpret: bool = False,
                 config: MosaicMatmulConfig | None = None):
  """act(x @ w_gate) * (x @ w_up), one pass over x; checked by api.py and `gated_refuses`.

  Differentiable: the Mosaic forward (saving both products), the Triton backward.
  """
  if x.size == 0 or w_gate.size == 0:
    return reference.gated_matmul(x, w_gate, w_up, activation=activation)
  return _gated_diff(x, w_gate, w_up, triton_impl._GatedStatic(activation, interpret, config))
