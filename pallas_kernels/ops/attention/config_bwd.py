"""Tuning knobs of the attention backward kernels, their heuristic and tuning key.

A separate dataclass (not fields of `AttentionConfig`): the forward config stays the one frozen
dataclass of `config.py` that autotune tunes, and a backward choice never changes a forward
tuning key. Backward entries share the op's tuned table; their key carries `"pass": "backward"`.

Two kernels, each with its own tile (FlashAttention-2, and the Triton fused-attention tutorial):
  dk/dv: one program per kv tile of `block_k_dkv` keys holds fp32 dk and dv accumulators
         [block_k_dkv, head_dim_pad] and walks the q tiles of `block_q_dkv` rows;
  dq:    one program per q tile of `block_q_dq` rows holds an fp32 dq accumulator and walks
         kv tiles of `block_k_dq` keys.
Rows count as in the forward: query positions x padded group size.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device
from pallas_kernels.ops.attention.config import (OP_DIR, padded_head_dim, shared_memory_budget,
                                                 shrink_to_fit, table_row, tuning_key)

_MIN_DOT = 16
_BLOCKS = ("block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


@dataclasses.dataclass(frozen=True)
class AttentionBwdConfig:
  block_q_dkv: int     # rows of each q tile the dk/dv kernel walks (power of two)
  block_k_dkv: int     # keys per dk/dv program: rows of its two fp32 accumulators
  num_warps_dkv: int
  num_stages_dkv: int  # pipelining depth of the q/dO tile loads
  block_q_dq: int      # rows per dq program: rows of its fp32 accumulator
  block_k_dq: int      # keys per kv tile the dq kernel walks
  num_warps_dq: int
  num_stages_dq: int   # pipelining depth of the K/V tile loads

  def __post_init__(self):
    for name in _BLOCKS:
      value = getattr(self, name)
      if not isinstance(value, int) or value < _MIN_DOT or value & (value - 1):
        raise ValueError(f"AttentionBwdConfig: `{name}` expected a power of two >= {_MIN_DOT}, "
                         f"got {value!r}")
    for name in ("num_warps_dkv", "num_warps_dq"):
      if getattr(self, name) not in (1, 2, 4, 8, 16):
        raise ValueError(f"AttentionBwdConfig: `{name}` expected one of (1, 2, 4, 8, 16), "
                         f"got {getattr(self, name)!r}")
    for name in ("num_stages_dkv", "num_stages_dq"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"AttentionBwdConfig: `{name}` expected a positive int, got {value!r}")


def shared_memory_bytes(cfg: AttentionBwdConfig, head_dim: int, dtype) -> int:
  """Upper estimate of the larger kernel's shared memory.

  dk/dv: per stage a q and a dO tile [block_q_dkv, d]; the K and V tiles [block_k_dkv, d]; two
  [block_k_dkv, block_q_dkv] buffers (P^T and dS^T change layout between MMAs).
  dq: per stage a K and a V tile [block_k_dq, d]; the q and dO tiles; one [block_q_dq, block_k_dq]
  buffer for dS. The audit reads the real figures from the cubins.
  """
  item = jnp.dtype(dtype).itemsize
  d = padded_head_dim(head_dim)
  dkdv = (cfg.num_stages_dkv * 2 * cfg.block_q_dkv * d + 2 * cfg.block_k_dkv * d
          + 2 * cfg.block_k_dkv * cfg.block_q_dkv) * item
  dq = (cfg.num_stages_dq * 2 * cfg.block_k_dq * d + 2 * cfg.block_q_dq * d
        + cfg.block_q_dq * cfg.block_k_dq) * item
  return max(dkdv, dq)


def accumulator_registers(cfg: AttentionBwdConfig, head_dim: int) -> int:
  """fp32 accumulator registers per thread of the hungrier kernel (dk/dv holds two)."""
  d = padded_head_dim(head_dim)
  return max(2 * cfg.block_k_dkv * d // (32 * cfg.num_warps_dkv),
             cfg.block_q_dq * d // (32 * cfg.num_warps_dq))


# (sm major, head_dim_pad) -> (block_q_dkv, block_k_dkv, warps_dkv, stages_dkv,
#                              block_q_dq, block_k_dq, warps_dq, stages_dq), 2-byte dtypes.
# Start: the Triton tutorial's 32x128 (dk/dv) and 128x32 (dq) tiles; then chosen with the offline
# audit (registers, spills and shared memory from the cubins; bench/notes/attention.md):
#   sm_80 d128: 32x128 dk/dv spills (8 B) and 128x64 dq spills (12 B): 64x64 and 128x32 instead.
#   sm_90 d128: the tutorial's 32x128 dk/dv fits (255 regs, no spill, 97 KB), dq 128x64.
#   d256: two [block_k, 256] fp32 accumulators; 32x32 dk/dv and 64x32 dq leave ~60 registers of
#   margin (16x64 and 32x64 dk/dv spill on sm_90).
_TABLE = {
    (8, 64): (32, 128, 8, 2, 128, 64, 8, 2),
    (8, 128): (64, 64, 8, 2, 128, 32, 8, 2),
    (8, 256): (32, 32, 8, 2, 64, 32, 8, 2),
    (9, 64): (32, 128, 8, 2, 128, 64, 8, 2),
    (9, 128): (32, 128, 8, 2, 128, 64, 8, 2),
    (9, 256): (32, 32, 8, 2, 64, 32, 8, 2),
}
# fp32: IEEE fp32 dots on the FMA units, the correctness path; small tiles.
_FP32 = {64: (16, 32, 8, 2, 32, 16, 8, 2), 128: (16, 32, 8, 2, 32, 16, 8, 2),
         256: (16, 16, 8, 1, 16, 16, 8, 1)}


def heuristic(target: device.Target, *, head_dim: int, dtype) -> AttentionBwdConfig:
  """A config for `target` within its shared memory; non-GPU targets (interpret) get Ampere's."""
  cfg = AttentionBwdConfig(*table_row(_TABLE, _FP32, target, head_dim=head_dim, dtype=dtype))
  # Only smaller cards (99 KB) reach this: fewer stages, then smaller tiles.
  return shrink_to_fit(cfg, target, lambda c: shared_memory_bytes(c, head_dim, dtype), _shrink)


def _shrink(cfg: AttentionBwdConfig) -> AttentionBwdConfig:
  for name in ("num_stages_dkv", "num_stages_dq"):
    if getattr(cfg, name) > 1:
      return dataclasses.replace(cfg, **{name: getattr(cfg, name) - 1})
  for name in ("block_k_dkv", "block_q_dq", "block_q_dkv", "block_k_dq"):
    if getattr(cfg, name) > _MIN_DOT:
      return dataclasses.replace(cfg, **{name: getattr(cfg, name) // 2})
  return cfg


def bwd_tuning_key(*, head_dim: int, dtype, causal: bool, q_len: int, kv_len: int) -> dict:
  return {**tuning_key(head_dim=head_dim, dtype=dtype, causal=causal, q_len=q_len,
                       kv_len=kv_len), "pass": "backward"}


def resolve(explicit: AttentionBwdConfig | None, *, head_dim: int, dtype, causal: bool,
            q_len: int, kv_len: int) -> AttentionBwdConfig:
  """Explicit config, else the tuned table of the current device, else the heuristic."""
  key = bwd_tuning_key(head_dim=head_dim, dtype=dtype, causal=causal, q_len=q_len,
                       kv_len=kv_len)
  return config_lib.resolve(AttentionBwdConfig, explicit, OP_DIR, key,
                            lambda target: heuristic(target, head_dim=head_dim, dtype=dtype))


# --- Hook for `python -m pallas_kernels.autotune --pass backward` (the public call's arguments)

_CANDIDATE_BLOCKS = (16, 32, 64, 128)
_CANDIDATE_WARPS = (4, 8)
_CANDIDATE_STAGES = (1, 2, 3)
# fp32 accumulator registers a thread the hungrier kernel may hold (as the forward's candidates):
# sm_90 d128's heuristic dk/dv (two [128, 128] accumulators, 8 warps) sits at the limit.
MAX_ACCUMULATOR_REGISTERS = 128


def bwd_candidates(target: device.Target, q, k, v, **kwargs) -> list[AttentionBwdConfig]:
  """Autotune hook: the heuristic first, then configs within shared memory whose accumulators
  stay <= MAX_ACCUMULATOR_REGISTERS a thread (or the heuristic's count, if more), nearest the
  heuristic first. The dk/dv and dq kernels run one after the other, so their halves of the
  config vary independently: each half is pruned alone (the other at the heuristic's), then
  paired."""
  del k, v, kwargs
  head_dim, dtype = q.shape[-1], q.dtype
  default = heuristic(target, head_dim=head_dim, dtype=dtype)
  budget = shared_memory_budget(target)
  registers = max(MAX_ACCUMULATOR_REGISTERS, accumulator_registers(default, head_dim))

  def fits(cfg: AttentionBwdConfig) -> bool:
    return (shared_memory_bytes(cfg, head_dim, dtype) <= budget
            and accumulator_registers(cfg, head_dim) <= registers)

  def halves(kernel: str) -> list[dict]:
    names = (f"block_q_{kernel}", f"block_k_{kernel}", f"num_warps_{kernel}",
             f"num_stages_{kernel}")
    found = [dict(zip(names, (bq, bk, warps, stages)))
             for bq in _CANDIDATE_BLOCKS for bk in _CANDIDATE_BLOCKS
             for warps in _CANDIDATE_WARPS for stages in _CANDIDATE_STAGES]
    return [h for h in found if fits(dataclasses.replace(default, **h))]

  def distance(cfg: AttentionBwdConfig) -> tuple:  # x2 steps per tile or warp field, + stages
    steps = sum(abs(getattr(cfg, f.name).bit_length() - getattr(default, f.name).bit_length())
                if f.name.startswith(("block", "num_warps"))
                else abs(getattr(cfg, f.name) - getattr(default, f.name))
                for f in dataclasses.fields(cfg))
    return steps, dataclasses.astuple(cfg)

  pairs = {AttentionBwdConfig(**dkv, **dq) for dkv in halves("dkv") for dq in halves("dq")}
  return [default, *sorted(pairs - {default}, key=distance)]
