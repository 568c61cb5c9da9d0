"""FlashAttention-3-style backward for Hopper in Pallas Mosaic GPU (`impl="mosaic"` gradients).

Same mathematics as `triton_bwd.py` (read its header): from the forward's output O and natural-log
lse L, with base-2 logits t (scale·log2(e) folded in; soft cap c·log2(e)·tanh(s·scale/c)):
  P = exp2(t - L·log2 e)   dV = Pᵀ dO   dP = dO Vᵀ   dS = P (dP - delta)  [· (1 - tanh²), soft cap]
  dK = scale dSᵀ Q         dQ = scale dS K          delta = rowsum(dO · O)
Deterministic, no atomics: two kernels, each owning its output tile.

  preprocess  XLA: delta (fp32) and L in base 2 (+inf for a row that saw no key, so its P is 0),
              both as [batch, heads, q_pad], q padded to whole 128-row tiles with (+inf, 0): rows
              past q_len get P = 0 without a mask, and each TMA reads one contiguous fp32 run.
  dk/dv       grid (kv tile of 2 x 64 keys, kv head, batch), three warpgroups. Consumers 0 and 1
              each TMA their own 64 keys of K and V once and hold fp32 dK and dV [64, d] in two
              wgmma accumulators for the whole program. The producer streams (q, dO, L, delta)
              tiles of `block_q_dkv` rows through a ring: first every q tile of query head 0 of
              the GQA group, then head 1, ... so dK/dV sum over the group in the accumulators
              (K/V never repeated, no cross-program reduction). Per tile a consumer issues
              Sᵀ = K Qᵀ and dPᵀ = V dOᵀ together (two wgmmas in flight), computes Pᵀ and dSᵀ
              in registers, stages each in SMEM as soon as it exists (the interpreter's wgmma
              takes A from SMEM only) and issues dV += Pᵀ dO (which runs on while dSᵀ is
              computed), then dK += dSᵀ Q.
  dq          grid (query head, q tile of 2 x 64 rows, batch): the forward's program, and its
              producer (`mosaic._produce`, K/V ring). Per kv tile: S = Q Kᵀ and dP = dO Vᵀ in
              flight together, dS staged in SMEM, dQ += dS K into an accumulator held across
              the loop.
The accumulators live in `pl.run_scoped` wgmma accumulators held across the loops (wgmma adds in
place; no `pl.run_state`, which jax 0.11.2's interpreter cannot run).

Block skipping: the dq kernel walks the forward's kv tile ranges (`mosaic._tile_range`); the dk/dv
kernel walks `triton_bwd._q_tile_ranges` of its 128 keys (producer) and of each consumer's 64
keys (masked / unmasked / masked, skipping tiles only the other consumer needs). As in the forward,
both consumers pass every ring phase exactly once. Ragged shapes: TMA reads past an array's end
give zeros and writes past it are dropped; keys past `lengths` / kv_len are masked by position.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ops.attention import mosaic
from pallas_kernels.ops.attention.mosaic import BLOCK_Q, NUM_CONSUMERS, _smem
from pallas_kernels.ops.attention.triton import LOG2_E
from pallas_kernels.ops.attention.triton_bwd import _q_tile_ranges

BLOCK_KV = 64  # keys per dk/dv consumer warpgroup: the M of its wgmmas
Q_PAD = NUM_CONSUMERS * BLOCK_Q  # L and delta are padded to whole dq programs (128 rows)


@dataclasses.dataclass(frozen=True)
class MosaicAttentionBwdConfig:
  """Tuning knobs of the Mosaic backward (each dk/dv program owns 2 x 64 keys, each dq program
  2 x 64 query rows; fixed by the wgmma M of the two consumers)."""

  block_q_dkv: int = 64   # query rows per (q, dO, L, delta) tile of the dk/dv ring: the N of Sᵀ
  num_stages_dkv: int = 2
  block_kv_dq: int = 64   # keys per K/V tile of the dq ring: the N of S
  num_stages_dq: int = 2

  def __post_init__(self):
    if self.block_q_dkv not in (64, 128):
      raise ValueError(f"MosaicAttentionBwdConfig: `block_q_dkv` expected 64 or 128 (it must "
                       f"divide the 128-row padding of L), got {self.block_q_dkv!r}")
    if not isinstance(self.block_kv_dq, int) or self.block_kv_dq < 64 \
        or self.block_kv_dq % 64 or self.block_kv_dq > 256:
      raise ValueError(f"MosaicAttentionBwdConfig: `block_kv_dq` expected a multiple of 64 in "
                       f"[64, 256], got {self.block_kv_dq!r}")
    for name in ("num_stages_dkv", "num_stages_dq"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
        raise ValueError(f"MosaicAttentionBwdConfig: `{name}` expected an int >= 2, "
                         f"got {getattr(self, name)!r}")


def shared_memory_bytes(cfg: MosaicAttentionBwdConfig, head_dim: int, dtype) -> tuple[int, int]:
  """(dk/dv, dq) SMEM bytes of the two kernels; equal to what the CUDA lowering reports (a test
  holds it to that). Each small fp32 buffer is padded to 1 KB (the alignment of the swizzled
  buffer after it); neither kernel reduces across warps, so Mosaic adds no reduction scratch.
  dk/dv: K and V of both consumers (reused for the dK, dV stores), the (q, dO, L, delta) ring,
  Pᵀ and dSᵀ of both consumers. dq: Q and dO of both consumers (Q reused for the dQ store), their
  L and delta, dS of both consumers, the K/V ring."""
  item = jnp.dtype(dtype).itemsize
  bq, bkv = cfg.block_q_dkv, cfg.block_kv_dq

  def fp32(n: int) -> int:
    return -(-n * 4 // 1024) * 1024
  dkdv = (2 * NUM_CONSUMERS * BLOCK_KV * head_dim * item
          + cfg.num_stages_dkv * 2 * bq * head_dim * item + 2 * fp32(cfg.num_stages_dkv * bq)
          + 2 * NUM_CONSUMERS * BLOCK_KV * bq * item
          + 8 * (2 * NUM_CONSUMERS + 5 * cfg.num_stages_dkv))
  dq = (2 * NUM_CONSUMERS * BLOCK_Q * head_dim * item + 2 * fp32(NUM_CONSUMERS * BLOCK_Q)
        + NUM_CONSUMERS * BLOCK_Q * bkv * item
        + cfg.num_stages_dq * 2 * bkv * head_dim * item
        + 8 * (4 * NUM_CONSUMERS + 4 * cfg.num_stages_dq))
  return dkdv, dq


def heuristic(head_dim: int) -> MosaicAttentionBwdConfig:
  """dk/dv: FA3's Hopper backward tile, 64 query rows against 2 x 64 keys; 3 stages (194 KB at
  d128; one CTA a SM either way). dq: 64-key tiles and 3 stages at d128 (178 KB; 128-key tiles
  with 2 stages fit too, 226.1 KB, but hold 64 more fp32 registers a thread); 128-key tiles at
  d64 (162 KB with 3 stages; dk/dv 114 KB)."""
  if head_dim > 64:
    return MosaicAttentionBwdConfig(block_q_dkv=64, num_stages_dkv=3, block_kv_dq=64,
                                    num_stages_dq=3)
  return MosaicAttentionBwdConfig(block_q_dkv=64, num_stages_dkv=3, block_kv_dq=128,
                                  num_stages_dq=3)


def refuses(q) -> str | None:
  """Why this backward cannot take a call (`vjp.py` runs the Triton backward instead), or None.
  Every option of the Mosaic forward is supported (causal or not, GQA, ragged q_len / kv_len,
  lengths, q_offset, sliding_window, logit_softcap, scale): only its dtypes and head_dims
  bound it."""
  return mosaic.refuses(q, None, None)


# ---- preprocess (XLA).

def _preprocess(o, do, lse):
  """(lse2, delta) fp32 [batch, heads, q_pad]: one fused XLA pass over O and dO."""
  q_len = o.shape[1]
  pad = ((0, 0), (0, 0), (0, pl.cdiv(q_len, Q_PAD) * Q_PAD - q_len))
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E).transpose(0, 2, 1)
  return (jnp.pad(lse2, pad, constant_values=jnp.inf), jnp.pad(delta, pad))


# ---- shared pieces.

def _logits(s: mosaic._Shape, raw):
  """(base-2 logits, tanh of the soft cap or None) from raw q.k products."""
  if s.softcap is None:
    return mosaic._scale(s, raw), None
  th = jnp.tanh(raw * (s.scale / s.softcap))
  return (s.softcap * LOG2_E) * th, th


def _ds(p, dp, delta, th, dim: int):
  """dS = P (dP - delta) [· (1 - tanh²)]; delta runs along `dim` of the tile."""
  ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [dim]))
  return ds if th is None else ds * (1.0 - th * th)


def _skip_ranges(t_lo, t_hi, own):
  """(start, stop, mode) of one consumer's pass over [t_lo, t_hi): skip, masked, unmasked,
  masked, skip. `own` = (lo, full_lo, full_hi, hi), clipped into [t_lo, t_hi]."""
  lo, full_lo, full_hi, hi = own
  return ((t_lo, lo, "skip"), (lo, full_lo, "masked"), (full_lo, full_hi, "unmasked"),
          (full_hi, hi, "masked"), (hi, t_hi, "skip"))


def _clip(own, t_lo, t_hi, nonempty):
  return tuple(jnp.where(nonempty, jnp.clip(t, t_lo, t_hi), t_hi) for t in own)


# ---- dk/dv.

def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, lengths_ref, q_offset_ref,
                 dk_ref, dv_ref, smem, barriers, *, s: mosaic._Shape, block_q: int):
  # q_ref, do_ref: [batch, q_len, num_heads, d];  k_ref, v_ref, dk_ref, dv_ref: [batch, kv_len,
  # kv_heads, d];  lse2_ref, delta_ref: [batch, num_heads, q_pad] fp32;  lengths, q_offset: [batch]
  # k_smem, v_smem: [2, 64, d];  q_ring, do_ring: [stages, block_q, d];  lse_ring, delta_ring:
  # [stages, block_q] fp32;  pt_smem, dst_smem: [2, 64, block_q]
  k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, pt_smem, dst_smem = smem
  k_loaded, v_loaded, *ring_barriers = barriers
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  kv0 = lax.axis_index("kv_seq") * (NUM_CONSUMERS * BLOCK_KV)
  length = jnp.clip(lengths_ref[batch], 0, s.kv_len)
  q_offset = q_offset_ref[batch]
  ranges = functools.partial(_q_tile_ranges, length=length, q_offset=q_offset,
                             positions=block_q, q_len=s.q_len, num_q_tiles=s.num_q_tiles,
                             causal=s.causal, window=s.window)
  t_lo, _, _, t_hi = ranges(kv0, block_k=NUM_CONSUMERS * BLOCK_KV)
  wg = lax.axis_index("wg")
  ring = (q_ring, do_ring, lse_ring, delta_ring, *ring_barriers)

  @pl.when(wg < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    key0 = kv0 + wg * BLOCK_KV
    keys = (batch, pl.ds(key0, BLOCK_KV), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[wg], k_loaded.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[wg], v_loaded.at[wg])
    plgpu.barrier_wait(k_loaded.at[wg])
    plgpu.barrier_wait(v_loaded.at[wg])
    own = ranges(key0, block_k=BLOCK_KV)
    own = _clip(own, t_lo, t_hi, key0 < length)
    operands = (k_smem.at[wg], v_smem.at[wg], pt_smem.at[wg], dst_smem.at[wg])

    def walk(dk_acc, dv_acc):
      @pl.loop(0, s.group)
      def _(g):
        step = functools.partial(_dkdv_step, s, block_q, operands, ring, (dk_acc, dv_acc),
                                 base=g * (t_hi - t_lo) - t_lo, key0=key0, length=length,
                                 q_offset=q_offset)
        for start, stop, mode in _skip_ranges(t_lo, t_hi, own):
          lax.fori_loop(start, stop, functools.partial(step, mode=mode), None)
      return dk_acc[...], dv_acc[...]
    acc = plgpu.ACC((BLOCK_KV, s.head_dim), jnp.float32)
    dk, dv = pl.run_scoped(walk, acc, acc)
    k_smem.at[wg][...] = (dk * s.scale).astype(k_smem.dtype)
    v_smem.at[wg][...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    _produce_q(s, block_q, (q_ref.at[batch], do_ref.at[batch], lse2_ref.at[batch],
                            delta_ref.at[batch]), ring, kv_head, t_lo, t_hi)


def _produce_q(s: mosaic._Shape, block_q: int, srcs, ring, kv_head, t_lo, t_hi):
  """TMA the (q, dO, L, delta) tiles t_lo..t_hi-1 of each query head of the group, head by
  head, into the ring; a slot is refilled once both consumers released it."""
  # srcs: q, dO [q_len, num_heads, d] and L, delta [num_heads, q_pad] of this batch row
  q_ref, do_ref, lse2_ref, delta_ref = srcs
  *bufs, q_loaded, do_loaded, lse_loaded, delta_loaded, consumed = ring
  n_t = t_hi - t_lo
  steps = s.group * n_t

  @pl.loop(0, steps)
  def _(j):
    slot = lax.rem(j, jnp.int32(s.num_stages))
    head = kv_head * s.group + lax.div(j, jnp.maximum(n_t, 1))
    rows = pl.ds((t_lo + lax.rem(j, jnp.maximum(n_t, 1))) * block_q, block_q)

    @pl.when(j >= s.num_stages)
    def _():
      plgpu.barrier_wait(consumed.at[slot])
    for src, buf, bar in zip((q_ref.at[rows, head], do_ref.at[rows, head],
                              lse2_ref.at[head, rows], delta_ref.at[head, rows]),
                             bufs, (q_loaded, do_loaded, lse_loaded, delta_loaded)):
      plgpu.copy_gmem_to_smem(src, buf.at[slot], bar.at[slot])

  @pl.loop(jnp.maximum(steps - s.num_stages, 0), steps)  # drain: observe the last releases
  def _(j):
    plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(s.num_stages))])


def _dkdv_step(s: mosaic._Shape, block_q: int, operands, ring, accs, t, carry, *, base, key0,
               length, q_offset, mode: str):
  """One q tile of one query head: wait for it, compute (unless skipped), release it."""
  k_smem, v_smem, pt_smem, dst_smem = operands
  q_ring, do_ring, lse_ring, delta_ring, *loaded, consumed = ring
  dk_acc, dv_acc = accs
  slot = lax.rem(base + t, jnp.int32(s.num_stages))
  for bar in loaded:
    plgpu.barrier_wait(bar.at[slot])
  if mode == "skip":
    plgpu.barrier_arrive(consumed.at[slot])
    return carry
  q, do = q_ring.at[slot], do_ring.at[slot]

  def products(st_ref, dpt_ref):
    plgpu.wgmma(st_ref, k_smem, q.transpose((1, 0)))
    plgpu.wgmma(dpt_ref, v_smem, do.transpose((1, 0)))
    return st_ref[...], dpt_ref[...]
  tile = plgpu.ACC((BLOCK_KV, block_q), jnp.float32)
  raw, dpt = pl.run_scoped(products, tile, tile)  # [64 keys, block_q queries] each
  logits, th = _logits(s, raw)
  if mode == "masked":
    logits = jnp.where(_visible_t(s, key0, q_offset + t * block_q, length, block_q), logits,
                       -jnp.inf)
  lse2 = plgpu.load(lse_ring.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  delta = plgpu.load(delta_ring.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  pt = jnp.exp2(logits - lax.broadcast_in_dim(lse2, logits.shape, [1]))
  pt_smem[...] = pt.astype(pt_smem.dtype)
  plgpu.commit_smem()
  plgpu.wgmma(dv_acc, pt_smem, do)  # runs on while dSᵀ is computed
  dst_smem[...] = _ds(pt, dpt, delta, th, 1).astype(dst_smem.dtype)
  plgpu.commit_smem()
  plgpu.wgmma(dk_acc, dst_smem, q)
  plgpu.wgmma_wait(0)  # the slot's q and dO are read: release it
  plgpu.barrier_arrive(consumed.at[slot])
  return carry


def _visible_t(s: mosaic._Shape, key0, pos0, length, block_q: int):
  """bool [64, block_q]: key key0 + i is visible to the query at absolute position pos0 + j."""
  shape = (BLOCK_KV, block_q)
  key = key0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  pos = pos0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  return mosaic.visible_keys(s, key, pos, length)


# ---- dq.

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, lengths_ref, q_offset_ref,
               dq_ref, smem, barriers, *, s: mosaic._Shape):
  # q_ref, do_ref, dq_ref: [batch, q_len, num_heads, d];  k_ref, v_ref: [batch, kv_len, kv_heads,
  # d];  lse2_ref, delta_ref: [batch, num_heads, q_pad] fp32;  lengths, q_offset: [batch] int32
  # q_smem, do_smem, ds_smem: [2, 64, d], [2, 64, d], [2, 64, block_kv];  lse_smem, delta_smem:
  # [2, 64] fp32;  k_smem, v_smem: [stages, block_kv, d]
  q_smem, do_smem, lse_smem, delta_smem, ds_smem, k_smem, v_smem = smem
  row_barriers, ring_barriers = barriers[:4], barriers[4:]
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  kv_head = lax.div(head, jnp.int32(s.group))
  q_start = (s.num_q_tiles - 1 - lax.axis_index("q_seq")) * Q_PAD  # heaviest causal tiles first
  length = jnp.clip(lengths_ref[batch], 0, s.kv_len)
  q_offset = q_offset_ref[batch]
  first, last = mosaic._program_rows(s, q_offset, q_start, Q_PAD)
  t_lo, _, _, t_hi = mosaic._tile_range(s, first, last, length)
  wg = lax.axis_index("wg")
  ring = (k_smem, v_smem, *ring_barriers)

  @pl.when(wg < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    row0 = q_start + wg * BLOCK_Q
    rows = (batch, pl.ds(row0, BLOCK_Q), head)
    for src, buf, bar in zip((q_ref.at[rows], do_ref.at[rows],
                              lse2_ref.at[batch, head, pl.ds(row0, BLOCK_Q)],
                              delta_ref.at[batch, head, pl.ds(row0, BLOCK_Q)]),
                             (q_smem, do_smem, lse_smem, delta_smem), row_barriers):
      plgpu.copy_gmem_to_smem(src, buf.at[wg], bar.at[wg])
    for bar in row_barriers:
      plgpu.barrier_wait(bar.at[wg])
    lse2 = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
    delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
    f, l = mosaic._program_rows(s, q_offset, row0, BLOCK_Q)
    own = _clip(mosaic._tile_range(s, f, l, length), t_lo, t_hi, f <= l)
    rows_smem = (q_smem.at[wg], do_smem.at[wg], ds_smem.at[wg])

    def walk(dq_acc):
      step = functools.partial(_dq_step, s, rows_smem, ring, dq_acc, (lse2, delta), t_lo=t_lo,
                               pos0=row0 + q_offset, length=length)
      for start, stop, mode in _skip_ranges(t_lo, t_hi, own):
        lax.fori_loop(start, stop, functools.partial(step, mode=mode), None)
      return dq_acc[...]
    dq = pl.run_scoped(walk, plgpu.ACC((BLOCK_Q, s.head_dim), jnp.float32))
    q_smem.at[wg][...] = (dq * s.scale).astype(q_smem.dtype)  # Q is no longer read
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    mosaic._produce(s, k_ref.at[batch, :, kv_head], v_ref.at[batch, :, kv_head], ring, t_lo,
                    t_hi)


def _dq_step(s: mosaic._Shape, rows_smem, ring, dq_acc, row_stats, t, carry, *, t_lo, pos0,
             length, mode: str):
  """One kv tile: wait for K and V, compute (unless skipped), release them."""
  q, do, ds_smem = rows_smem
  k_smem, v_smem, k_loaded, v_loaded, k_consumed, v_consumed = ring
  slot = lax.rem(t - t_lo, jnp.int32(s.num_stages))
  plgpu.barrier_wait(k_loaded.at[slot])
  if mode == "skip":
    plgpu.barrier_arrive(k_consumed.at[slot])
    plgpu.barrier_wait(v_loaded.at[slot])
    plgpu.barrier_arrive(v_consumed.at[slot])
    return carry
  k, v = k_smem.at[slot], v_smem.at[slot]

  def products(s_ref, dp_ref):
    plgpu.wgmma(s_ref, q, k.transpose((1, 0)))
    plgpu.barrier_wait(v_loaded.at[slot])  # S = Q Kᵀ runs on meanwhile
    plgpu.wgmma(dp_ref, do, v.transpose((1, 0)))
    return s_ref[...], dp_ref[...]
  tile = plgpu.ACC((BLOCK_Q, s.block_kv), jnp.float32)
  raw, dp = pl.run_scoped(products, tile, tile)  # [64 queries, block_kv keys] each
  plgpu.barrier_arrive(v_consumed.at[slot])
  logits, th = _logits(s, raw)
  if mode == "masked":
    logits = jnp.where(mosaic._visible(s, pos0, t * s.block_kv, length), logits, -jnp.inf)
  lse2, delta = row_stats
  p = jnp.exp2(logits - lax.broadcast_in_dim(lse2, logits.shape, [0]))
  ds_smem[...] = _ds(p, dp, delta, th, 0).astype(ds_smem.dtype)
  plgpu.commit_smem()
  plgpu.wgmma(dq_acc, ds_smem, k)
  plgpu.wgmma_wait(0)  # K is read: release it
  plgpu.barrier_arrive(k_consumed.at[slot])
  return carry


# ---- wrapper.

@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale", "cfg",
                                             "interpret"))
def backward(q, k, v, lengths, q_offset, o, lse, do, *, causal: bool, window: int | None,
             softcap: float | None, scale: float, cfg: MosaicAttentionBwdConfig,
             interpret: bool):
  """(dq, dk, dv) in the dtypes of q, k, v. lse: the forward's fp32 natural-log lse
  [batch, q_len, heads] (-inf for a row that saw no key)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  lse2, delta = _preprocess(o, do, lse)
  operands = (q, k, v, do, lse2, delta, lengths.astype(jnp.int32), q_offset.astype(jnp.int32))
  shape = dict(q_len=q_len, kv_len=kv_len, group=num_heads // num_kv_heads, head_dim=head_dim,
               causal=causal, window=window, softcap=softcap, scale=scale)
  params = dict(num_threads=NUM_CONSUMERS + 1, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=plgpu.InterpretGPUParams() if interpret else None)
  dk, dv = _dkdv(operands, shape, cfg, params, num_kv_heads=num_kv_heads, batch=batch)
  dq = _dq(operands, shape, cfg, params, num_heads=num_heads, batch=batch)
  return dq, dk, dv


def _dkdv(operands, shape: dict, cfg: MosaicAttentionBwdConfig, params: dict, *,
          num_kv_heads: int, batch: int):
  q, k = operands[:2]
  bq, stages, head_dim = cfg.block_q_dkv, cfg.num_stages_dkv, shape["head_dim"]
  s = mosaic._Shape(num_q_tiles=pl.cdiv(shape["q_len"], bq), block_kv=BLOCK_KV,
                    num_stages=stages, **shape)
  keys = (NUM_CONSUMERS, BLOCK_KV, head_dim)
  kernel = plgpu.kernel(
      functools.partial(_dkdv_kernel, s=s, block_q=bq),
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)),
      scratch_types=(
          (_smem(keys, k.dtype), _smem(keys, k.dtype),
           _smem((stages, bq, head_dim), q.dtype), _smem((stages, bq, head_dim), q.dtype),
           plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
           _smem((NUM_CONSUMERS, BLOCK_KV, bq), q.dtype),
           _smem((NUM_CONSUMERS, BLOCK_KV, bq), q.dtype)),
          (plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # k_loaded
           plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # v_loaded
           *[plgpu.Barrier(num_barriers=stages)] * 4,  # q, dO, L, delta loaded
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages)),  # consumed
      ),
      grid=(pl.cdiv(shape["kv_len"], NUM_CONSUMERS * BLOCK_KV), num_kv_heads, batch),
      grid_names=("kv_seq", "heads", "batch"),
      kernel_name="attention_bwd_dkdv_mosaic",
      **params,
  )
  return kernel(*operands)


def _dq(operands, shape: dict, cfg: MosaicAttentionBwdConfig, params: dict, *, num_heads: int,
        batch: int):
  q = operands[0]
  bkv, stages, head_dim = cfg.block_kv_dq, cfg.num_stages_dq, shape["head_dim"]
  s = mosaic._Shape(num_q_tiles=pl.cdiv(shape["q_len"], Q_PAD), block_kv=bkv,
                    num_stages=stages, **shape)
  rows = (NUM_CONSUMERS, BLOCK_Q, head_dim)
  kernel = plgpu.kernel(
      functools.partial(_dq_kernel, s=s),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=(
          (_smem(rows, q.dtype), _smem(rows, q.dtype),
           plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q), jnp.float32),
           plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q), jnp.float32),
           _smem((NUM_CONSUMERS, BLOCK_Q, bkv), q.dtype),
           _smem((stages, bkv, head_dim), q.dtype), _smem((stages, bkv, head_dim), q.dtype)),
          (*[plgpu.Barrier(num_barriers=NUM_CONSUMERS)] * 4,  # q, dO, L, delta loaded
           plgpu.Barrier(num_barriers=stages),  # k_loaded
           plgpu.Barrier(num_barriers=stages),  # v_loaded
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),  # k_consumed
           plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages)),  # v_consumed
      ),
      grid=(num_heads, s.num_q_tiles, batch),
      grid_names=("heads", "q_seq", "batch"),
      kernel_name="attention_bwd_dq_mosaic",
      **params,
  )
  return kernel(*operands)
