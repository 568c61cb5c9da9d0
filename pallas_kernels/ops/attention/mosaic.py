"""FlashAttention-3-style forward for Hopper in Pallas Mosaic GPU (`impl="mosaic"`).

Grid (query head, q tile, batch); every program runs three warpgroups:
  consumers 0 and 1  each own BLOCK_Q = 64 query rows (one wgmma M): S = Q Kᵀ and O += P V
                     with wgmma, the online softmax in fp32 registers in between.
  producer (2)       streams the K and V tiles of the program's kv range through a ring of
                     `num_stages` SMEM slots with TMA; per slot a "loaded" barrier (TMA
                     transaction count) and a "consumed" barrier (one arrival per consumer).
GQA: query head h reads kv head h // group; K/V are never repeated (programs of one group
read the same tiles, which L2 serves). Ping-pong (FA3, `pingpong=True`): a barrier the two
consumers meet at twice per tile, offset by half a tile, so one's softmax overlaps the other's
wgmmas. P reaches the second wgmma through SMEM unless `p_in_registers` (see the config).

Block skipping as in the Triton kernel (`triton._kv_tile_ranges`): the producer streams only
the tiles some row of the program can see; each consumer splits them into masked-below,
unmasked and masked-above ranges of its own rows, and *skips* (waits and releases without
computing) the tiles only the other consumer needs, so both consumers pass every ring phase
exactly once (barrier parities stay in step).

Ragged shapes need no padding: TMA reads past an array's end return zeros (OOBFillMode.ZEROS,
modelled by the interpreter) and TMA writes past it are dropped. Keys past `lengths` (and past
kv_len) are masked by position in the masked ranges, so the zeros never reach the softmax.

Online softmax in base 2 (scale * log2(e) folded in) with fp32 statistics, like the Triton
kernel; a row that sees no key keeps l = 0 and writes zeros, with lse = -inf. The outputs are
o [batch, q_len, num_heads, head_dim] and the natural-log lse [batch, q_len, num_heads] fp32:
exactly what `triton_bwd.backward` expects, so `vjp.py` pairs this forward with that backward.
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

from pallas_kernels.ops.attention.triton import LN_2, LOG2_E, _kv_tile_ranges

BLOCK_Q = 64  # query rows per consumer warpgroup: the M of one wgmma
NUM_CONSUMERS = 2  # FA3: two consumer warpgroups share one K/V ring
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SWIZZLE_BYTES = 128  # the widest wgmma swizzle: 64 two-byte elements a row
_REDUCTION_SCRATCH = plgpu.CompilerParams().reduction_scratch_bytes  # SMEM for cross-warp max/sum


@dataclasses.dataclass(frozen=True)
class MosaicAttentionConfig:
  """Tuning knobs of the Mosaic kernel (the q tile is fixed: 2 consumers x 64 rows)."""

  block_kv: int = 128   # keys per K/V tile: the N of S = Q Kᵀ and the K of O += P V
  num_stages: int = 2   # K/V tiles in flight (SMEM ring slots)
  # FA3 feeds P to the second wgmma from registers. The Mosaic GPU interpreter (jax 0.11.2)
  # only takes wgmma operands from SMEM, so by default P goes through a [64, block_kv] SMEM
  # buffer per consumer; True is the register path: compiled GPU only, lowered offline but
  # never run here.
  p_in_registers: bool = False
  # FA3's ping-pong: a barrier both consumers meet at twice per tile, offset by one meeting, so
  # one consumer's softmax runs while the other's wgmmas hold the tensor cores.
  pingpong: bool = True

  def __post_init__(self):
    if not isinstance(self.block_kv, int) or self.block_kv < 64 or self.block_kv % 64 \
        or self.block_kv > 256:
      raise ValueError(f"MosaicAttentionConfig: `block_kv` expected a multiple of 64 in "
                       f"[64, 256] (wgmma N, 128-byte swizzle), got {self.block_kv!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 2:
      raise ValueError(f"MosaicAttentionConfig: `num_stages` expected an int >= 2, "
                       f"got {self.num_stages!r}")
    for name in ("p_in_registers", "pingpong"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"MosaicAttentionConfig: `{name}` expected a bool, "
                         f"got {getattr(self, name)!r}")


def shared_memory_bytes(cfg: MosaicAttentionConfig, head_dim: int, dtype) -> int:
  """Q (reused for O) of both consumers, the K and V ring, P unless in registers, the lse
  staging buffer, Mosaic's reduction scratch and the barriers. Within 1 KB of what the CUDA
  lowering reports (alignment padding); a test holds it to that."""
  item = jnp.dtype(dtype).itemsize
  q = NUM_CONSUMERS * BLOCK_Q * head_dim * item
  ring = cfg.num_stages * 2 * cfg.block_kv * head_dim * item
  p = 0 if cfg.p_in_registers else NUM_CONSUMERS * BLOCK_Q * cfg.block_kv * item
  barriers = 8 * (NUM_CONSUMERS + 4 * cfg.num_stages + cfg.pingpong)
  return q + ring + p + NUM_CONSUMERS * BLOCK_Q * 4 + _REDUCTION_SCRATCH + barriers


def heuristic(head_dim: int) -> MosaicAttentionConfig:
  """FA3's Hopper tile: 128 keys. Stages as SMEM allows with P staged (227 KB a block): 2 at
  head_dim 128 (~195 KB; 3 would be ~259 KB), 3 at 64 (~147 KB)."""
  return MosaicAttentionConfig(block_kv=128, num_stages=2 if head_dim > 64 else 3)


def refuses(q, k, v, *, config=None, **kwargs) -> str | None:
  """Why impl="mosaic" cannot run this call, or None."""
  del k, v, kwargs
  if jnp.dtype(q.dtype) not in DTYPES:
    return f"impl='mosaic' supports bfloat16/float16, got {jnp.dtype(q.dtype).name}"
  if q.shape[-1] not in HEAD_DIMS:
    return f"impl='mosaic' supports head_dim in {HEAD_DIMS}, got {q.shape[-1]}"
  if config is not None and not isinstance(config, MosaicAttentionConfig):
    return (f"impl='mosaic' takes config=MosaicAttentionConfig or None, "
            f"got {type(config).__name__}")
  return None


@dataclasses.dataclass(frozen=True)
class _Shape:
  """Static facts of one call that the kernel body needs."""

  q_len: int
  kv_len: int
  group: int
  head_dim: int
  num_q_tiles: int
  block_kv: int
  num_stages: int
  causal: bool
  window: int | None
  softcap: float | None
  scale: float


def _program_rows(s: _Shape, q_offset, q_start, rows: int):
  """(first, last) absolute positions of the real queries among `rows` from q_start."""
  first = q_offset + q_start
  last = q_offset + jnp.minimum(q_start + rows, s.q_len) - 1
  return first, last


def _tile_range(s: _Shape, first, last, length):
  return _kv_tile_ranges(first, last, length, block_k=s.block_kv, causal=s.causal,
                         window=s.window)


def _kernel(q_ref, k_ref, v_ref, lengths_ref, q_offset_ref,  # inputs, in GMEM
            o_ref, lse_ref,  # outputs, in GMEM
            smem, barriers, *, s: _Shape):
  # q_ref, o_ref: [batch, q_len, num_heads, head_dim];  k_ref, v_ref: [batch, kv_len, kv_heads, d]
  # lengths_ref, q_offset_ref: [batch] int32;  lse_ref: [batch, num_heads, q_tiles * 128] fp32
  # qo_smem: [2, BLOCK_Q, d];  k_smem, v_smem: [num_stages, block_kv, d];  lse_smem: [2, BLOCK_Q]
  # p_smem: [2, BLOCK_Q, block_kv], or None when P stays in registers
  qo_smem, k_smem, v_smem, p_smem, lse_smem = smem
  q_loaded, k_loaded, v_loaded, k_consumed, v_consumed, sched = barriers
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  kv_head = lax.div(head, jnp.int32(s.group))
  # Heaviest causal tiles (the last queries) first.
  q_start = (s.num_q_tiles - 1 - lax.axis_index("q_seq")) * (NUM_CONSUMERS * BLOCK_Q)
  length = jnp.clip(lengths_ref[batch], 0, s.kv_len)
  q_offset = q_offset_ref[batch]
  first, last = _program_rows(s, q_offset, q_start, NUM_CONSUMERS * BLOCK_Q)
  t_lo, _, _, t_hi = _tile_range(s, first, last, length)
  wg = lax.axis_index("wg")
  ring = (k_smem, v_smem, k_loaded, v_loaded, k_consumed, v_consumed)

  @pl.when(wg < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    row0 = q_start + wg * BLOCK_Q
    qo = qo_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, BLOCK_Q), head], qo, q_loaded.at[wg])
    plgpu.barrier_wait(q_loaded.at[wg])
    p_buf = None if p_smem is None else p_smem.at[wg]
    acc, m, l = _consume(s, wg, qo, p_buf, ring, sched, row0, q_offset, length, t_lo, t_hi)
    seen = l > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    qo[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(qo.dtype)
    lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * LN_2,
                                     -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo, o_ref.at[batch, pl.ds(row0, BLOCK_Q), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(row0, BLOCK_Q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    _produce(s, k_ref.at[batch, :, kv_head], v_ref.at[batch, :, kv_head], ring, t_lo, t_hi)


def _produce(s: _Shape, k_ref, v_ref, ring, t_lo, t_hi):
  """TMA K and V tiles t_lo..t_hi-1 into the ring; a slot is refilled once both consumers
  released it."""
  # k_ref, v_ref: [kv_len, head_dim] of this program's batch row and kv head
  k_smem, v_smem, k_loaded, v_loaded, k_consumed, v_consumed = ring

  @pl.loop(0, t_hi - t_lo)
  def _(j):
    slot = lax.rem(j, jnp.int32(s.num_stages))
    keys = pl.ds((t_lo + j) * s.block_kv, s.block_kv)

    @pl.when(j >= s.num_stages)
    def _():
      plgpu.barrier_wait(k_consumed.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])

    @pl.when(j >= s.num_stages)
    def _():
      plgpu.barrier_wait(v_consumed.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

  # Drain: observe the last releases too. Idle time for the producer on a GPU, but every phase
  # of a barrier must be observed by each thread that waits on it (the interpreter checks),
  # and it keeps the parity bookkeeping exact.
  @pl.loop(jnp.maximum(t_hi - t_lo - s.num_stages, 0), t_hi - t_lo)
  def _(j):
    slot = lax.rem(j, jnp.int32(s.num_stages))
    plgpu.barrier_wait(k_consumed.at[slot])
    plgpu.barrier_wait(v_consumed.at[slot])


def _meet(sched):
  """Ping-pong: wait until the other consumer gets here too (nothing without ping-pong)."""
  if sched is not None:
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


def _consume(s: _Shape, wg, qo, p_smem, ring, sched, row0, q_offset, length, t_lo, t_hi):
  """One consumer's pass over the ring: (acc [BLOCK_Q, d], m, l [BLOCK_Q]) fp32, m in base 2."""
  first, last = _program_rows(s, q_offset, row0, BLOCK_Q)
  own = _tile_range(s, first, last, length)
  # Rows past q_len (the last q tile): this consumer computes nothing, but still passes the ring.
  own = tuple(jnp.where(first <= last, jnp.clip(t, t_lo, t_hi), t_hi) for t in own)
  lo, full_lo, full_hi, hi = own  # clipping keeps lo <= full_lo <= full_hi <= hi
  acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, s.head_dim), jnp.float32), plgpu.Layout.WGMMA)
  m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                        plgpu.Layout.WGMMA.reduce(1))
  l = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  carry = (acc, m, l)
  step = functools.partial(_step, s, qo, p_smem, ring, sched, t_lo, row0 + q_offset, length)
  # Ping-pong: every step (skipped or not) meets twice, so the consumers' meetings pair up one
  # to one; consumer 1 meets once before and consumer 0 once after the loop, which offsets them
  # by half a tile: consumer 0's softmax pairs with consumer 1's wgmmas and vice versa.
  pl.when(wg == 1)(lambda: _meet(sched))
  for start, stop, mode in ((t_lo, lo, "skip"), (lo, full_lo, "masked"),
                            (full_lo, full_hi, "unmasked"), (full_hi, hi, "masked"),
                            (hi, t_hi, "skip")):
    carry = lax.fori_loop(start, stop, functools.partial(step, mode=mode), carry)
  pl.when(wg == 0)(lambda: _meet(sched))
  return carry


def _step(s: _Shape, qo, p_smem, ring, sched, t_lo, pos0, length, t, carry, *, mode: str):
  """One kv tile: wait for it, compute (unless skipped), release it. With ping-pong, meet the
  other consumer after issuing S = Q Kᵀ and around the wait for V, skipped or not."""
  k_smem, v_smem, k_loaded, v_loaded, k_consumed, v_consumed = ring
  slot = lax.rem(t - t_lo, jnp.int32(s.num_stages))
  plgpu.barrier_wait(k_loaded.at[slot])
  if mode == "skip":
    _meet(sched)
    plgpu.barrier_arrive(k_consumed.at[slot])
    _wait_v(sched, v_loaded.at[slot])
    plgpu.barrier_arrive(v_consumed.at[slot])
    return carry
  acc, m_prev, l_prev = carry

  def qk(acc_ref):
    plgpu.wgmma(acc_ref, qo, k_smem.at[slot].transpose((1, 0)))
    _meet(sched)  # the wgmma runs on while we wait; reading acc_ref below waits for it
    return acc_ref[...]
  logits = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, s.block_kv), jnp.float32))
  plgpu.barrier_arrive(k_consumed.at[slot])  # the value read above waited for the wgmma
  logits = _scale(s, logits)
  if mode == "masked":
    logits = jnp.where(_visible(s, pos0, t * s.block_kv, length), logits, -jnp.inf)
  m_next = jnp.maximum(m_prev, logits.max(axis=1))
  # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
  m_base = jnp.where(m_next == -jnp.inf, 0.0, m_next) if mode == "masked" else m_next
  alpha = jnp.exp2(m_prev - m_base)
  p = jnp.exp2(logits - lax.broadcast_in_dim(m_base, logits.shape, [0]))
  l_next = l_prev * alpha + p.sum(axis=1)
  p16 = p.astype(v_smem.dtype)

  # P V into a fresh accumulator, then acc * alpha + PV (as the Triton kernel). Accumulating in
  # place (pl.run_state with plgpu.ACC.init(acc)) saves 64 registers a thread at d=128, but
  # the Mosaic GPU interpreter of jax 0.11.2 cannot run run_state, and an untested GPU-only
  # variant is worse than a few registers.
  if p_smem is not None:  # the interpreter's wgmma reads A from SMEM only
    p_smem[...] = p16
    plgpu.commit_smem()
    p16 = p_smem
  _wait_v(sched, v_loaded.at[slot])

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
    return acc_ref[...]
  pv_out = pl.run_scoped(pv, plgpu.ACC((BLOCK_Q, s.head_dim), jnp.float32))
  plgpu.barrier_arrive(v_consumed.at[slot])
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_out
  return acc, m_next, l_next


def _wait_v(sched, v_loaded):
  """Wait for the V tile; with ping-pong, announce the end of this softmax first and then wait
  for the other consumer's, so the two consumers' P V wgmmas alternate."""
  if sched is not None:
    plgpu.barrier_arrive(sched)
  plgpu.barrier_wait(v_loaded)
  if sched is not None:
    plgpu.barrier_wait(sched)


def _scale(s: _Shape, logits):
  """Raw q.k -> base-2 logits: scale * log2(e), or the soft cap c * tanh(scale * x / c)."""
  if s.softcap is None:
    return logits * (s.scale * LOG2_E)
  return (s.softcap * LOG2_E) * jnp.tanh(logits * (s.scale / s.softcap))


def _visible(s: _Shape, pos0, key0, length):
  """bool [BLOCK_Q, block_kv]: row i (absolute position pos0 + i) sees key key0 + j."""
  shape = (BLOCK_Q, s.block_kv)
  pos = pos0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  key = key0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  return visible_keys(s, key, pos, length)


def visible_keys(s: _Shape, key, pos, length):
  """The mask rule, elementwise: key < length, and causal (with the window) against pos."""
  visible = key < length
  if s.causal:
    visible = visible & (key <= pos)
    if s.window is not None:
      visible = visible & (key > pos - s.window)
  return visible


def _smem(shape, dtype):
  """SMEM in the layout wgmma reads: (8, 64) tiles, 128-byte swizzle."""
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
      plgpu.SwizzleTransform(_SWIZZLE_BYTES)))


def attention(q, k, v, *, causal: bool = True, lengths=None, q_offset=None,
              sliding_window: int | None = None, logit_softcap: float | None = None,
              scale: float | None = None, config: MosaicAttentionConfig | None = None,
              interpret: bool = False, return_lse: bool = False):
  """The Mosaic forward alone (no gradient; `vjp.py` adds one). Arguments checked by
  `api.attention`. return_lse: also return the fp32 natural-log lse [batch, q_len, heads]."""
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  if lengths is None:
    lengths = jnp.full((batch,), kv_len, jnp.int32)
  if q_offset is None:
    q_offset = jnp.full((batch,), kv_len - q_len, jnp.int32)
  o, lse = forward(q, k, v, lengths, q_offset, causal=causal, window=sliding_window,
                   softcap=None if logit_softcap is None else float(logit_softcap),
                   scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
                   cfg=config or heuristic(head_dim), interpret=interpret)
  return (o, lse) if return_lse else o


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale", "cfg",
                                             "interpret"))
def forward(q, k, v, lengths, q_offset, *, causal: bool, window: int | None,
            softcap: float | None, scale: float, cfg: MosaicAttentionConfig, interpret: bool):
  """(o [batch, q_len, heads, d] in q's dtype, lse [batch, q_len, heads] fp32)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  rows = NUM_CONSUMERS * BLOCK_Q
  s = _Shape(q_len=q_len, kv_len=kv_len, group=num_heads // num_kv_heads, head_dim=head_dim,
             num_q_tiles=pl.cdiv(q_len, rows), block_kv=cfg.block_kv,
             num_stages=cfg.num_stages, causal=causal, window=window, softcap=softcap,
             scale=scale)
  if interpret and cfg.p_in_registers:
    raise ValueError("attention: MosaicAttentionConfig(p_in_registers=True) is GPU-only: the "
                     "Mosaic GPU interpreter takes wgmma operands from SMEM only")
  stages = cfg.num_stages
  kernel = plgpu.kernel(
      functools.partial(_kernel, s=s),
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                # q minor: each consumer writes its 64 rows with one contiguous 1-D TMA. Padded
                # to whole q tiles: TMA needs 16-byte row strides (q_len % 4 == 0 otherwise).
                jax.ShapeDtypeStruct((batch, num_heads, s.num_q_tiles * rows), jnp.float32)),
      scratch_types=(
          (_smem((NUM_CONSUMERS, BLOCK_Q, head_dim), q.dtype),
           _smem((stages, cfg.block_kv, head_dim), q.dtype),
           _smem((stages, cfg.block_kv, head_dim), q.dtype),
           None if cfg.p_in_registers else _smem((NUM_CONSUMERS, BLOCK_Q, cfg.block_kv), q.dtype),
           plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q), jnp.float32)),
          (plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # q_loaded
           plgpu.Barrier(num_barriers=stages),  # k_loaded
           plgpu.Barrier(num_barriers=stages),  # v_loaded
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),  # k_consumed
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),  # v_consumed
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS) if cfg.pingpong else None),  # sched
      ),
      grid=(num_heads, s.num_q_tiles, batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=NUM_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="attention_fwd_mosaic",
  )
  o, lse = kernel(q, k, v, lengths.astype(jnp.int32), q_offset.astype(jnp.int32))
  return o, jnp.transpose(lse[:, :, :q_len], (0, 2, 1))
