"""Tuning knobs of the tiled matmul, the heuristic that picks them, and the tuning key.

Resolution (explicit > tuned table > heuristic) goes through `_core.config.resolve`.
The kernel keeps a `[block_m, block_n]` fp32 accumulator (two for the gated matmul) in
registers and streams `num_stages` pairs of `[block_m, block_k]` x tiles and
`[block_k, block_n]` weight tiles through shared memory, so

    shared memory ~= num_stages * (block_m * block_k + weights * block_k * block_n) * itemsize

must fit the target's per-block limit (163 KB on A100, 227 KB on H100). The backward
kernels (dx = dz @ w.T, dw = x.T @ dz; see `triton.py`) resolve their own configs from the
same heuristic for their own problem shapes, keyed with a `variant` ("dx", "dw") and, for the
gated dx (two lhs tiles per K step), `lhs=2` in the shared-memory estimate. Two regimes:
decode (M <= 64) is a GEMV over the weights, bound by weight bytes: a 16-row tile, wide
K steps and narrow N tiles so that there are about as many programs as SMs. Prefill
(large M) is bound by tensor-core FLOPs: big square-ish tiles with grouped ordering.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax.numpy as jnp

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device

OP_DIR = Path(__file__).parent

# tl.dot needs every tile dimension >= 16; the Triton lowering needs powers of two.
MIN_BLOCK = 16
# Largest M handled as decode (a GEMV over the weights).
DECODE_MAX_M = 64
# Shared memory the kernel needs besides the pipeline buffers (the epilogue's layout
# conversion of the accumulator goes through shared memory; barriers).
EPILOGUE_RESERVE_BYTES = 8 * 1024
# Per-block shared memory assumed off-GPU (interpret mode): Ampere-class consumer cards.
FALLBACK_SMEM_BYTES = 99 * 1024
FALLBACK_NUM_SMS = 108


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  block_m: int  # rows of x (and of the output) per program, a power of two >= 16
  block_n: int  # columns of w per program, a power of two >= 16
  block_k: int  # reduction step of the K loop, a power of two >= 16
  group_m: int = 8  # tile rows walked together by the grouped (L2-friendly) ordering
  num_warps: int = 4
  num_stages: int = 3  # software-pipeline depth of the K loop

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MatmulConfig: `{name}` expected a positive int, got {value!r}")
    for name in ("block_m", "block_n", "block_k"):
      value = getattr(self, name)
      if value < MIN_BLOCK or not _is_power_of_2(value):
        raise ValueError(f"MatmulConfig: `{name}` expected a power of two >= {MIN_BLOCK}, "
                         f"got {value}")
    if not _is_power_of_2(self.num_warps) or self.num_warps > 16:
      raise ValueError(f"MatmulConfig: `num_warps` expected a power of two <= 16, "
                       f"got {self.num_warps}")


def smem_bytes(config: MatmulConfig, itemsize: int, num_weights: int = 1, lhs: int = 1) -> int:
  """Shared memory of the pipelined K loop: `lhs` x tiles plus one tile per weight, per stage."""
  per_stage = (lhs * config.block_m * config.block_k
               + num_weights * config.block_k * config.block_n)
  return config.num_stages * per_stage * itemsize


def m_bucket(m: int) -> int:
  """Tuning-key bucket of the row count: the next power of two, at least 16."""
  return max(MIN_BLOCK, next_power_of_2(m))


def tuning_key(m: int, n: int, k: int, dtype, gated: bool, variant: str | None = None) -> dict:
  """`variant` names a backward kernel ("dx", "dw"): its problem is (m, n, k) of that product."""
  key = {"dtype": jnp.dtype(dtype).name, "m": m_bucket(m), "n": n, "k": k, "gated": bool(gated)}
  return key if variant is None else {**key, "variant": variant}


def _decode_block_n(n: int, num_sms: int, widest: int) -> int:
  """Widest N tile (up to `widest`) that still gives about one program per SM (at least 32).

  A GEMV is bound by weight bytes; every SM must stream its share, so the grid needs
  ~num_sms programs. Narrower than 32 wastes the 16-byte vector loads of a tile row.
  """
  block_n = widest
  while block_n > 32 and -(-n // block_n) < num_sms:
    block_n //= 2
  return block_n


def _base(target: device.Target, m: int, n: int, itemsize: int, gated: bool) -> MatmulConfig:
  """`gated`: the register-heavy tile family (see `heuristic`)."""
  hopper = target.is_hopper
  num_sms = target.num_sms or FALLBACK_NUM_SMS
  wide = itemsize <= 2  # bf16/fp16 feed the tensor cores; fp32 runs on FMA units (IEEE)
  if m <= DECODE_MAX_M:
    block_m = max(MIN_BLOCK, next_power_of_2(m))
    # At most 64 wide: the audit's ptxas saw a 16x128 tile spill on sm_90 (mma.sync layout).
    block_n = _decode_block_n(n, num_sms, 64)
    # ~32 KB of each weight per K step: deep enough to keep bytes in flight, short
    # enough that a few stages fit.
    block_k = min(256, 32 * 1024 // (block_n * itemsize))
    return MatmulConfig(block_m, block_n, block_k, group_m=8, num_warps=4,
                        num_stages=5 if hopper else 4)
  if m <= 256:
    return MatmulConfig(64, 64 if gated else 128, 64 if wide else 32, group_m=8, num_warps=4,
                        num_stages=4)
  if not wide:
    return MatmulConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=3)
  # Prefill. At most ~128 accumulator floats per thread (bm * bn * weights / (32 * warps)):
  # the offline audit (ptxas via the triton wheel) showed 128x256 tiles on 8 warps and
  # 128x128 tiles on 4 warps spilling, the configs below at 0 bytes of stack.
  if gated:
    return MatmulConfig(128, 128, 64 if hopper else 32, group_m=8, num_warps=8,
                        num_stages=3 if hopper else 4)
  return MatmulConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4 if hopper else 3)


def _fit(config: MatmulConfig, m: int, n: int, k: int, itemsize: int, num_weights: int,
         smem_limit: int, lhs: int = 1) -> MatmulConfig:
  """Clamp tiles to the (padded) problem, then shrink until the pipeline fits shared memory.

  Order: stages down to 3, block_k down to 64, stages down to 2, block_k down to 16, then
  block_n. Keeping >= 3 stages (2 tiles in flight) matters more to a bandwidth-bound GEMV
  than a long K step.
  """
  def clamp(block, size):
    return max(MIN_BLOCK, min(block, next_power_of_2(size)))
  config = dataclasses.replace(config, block_m=clamp(config.block_m, m),
                               block_n=clamp(config.block_n, n),
                               block_k=clamp(config.block_k, k))
  budget = smem_limit - EPILOGUE_RESERVE_BYTES
  steps = (("num_stages", 3, 1), ("block_k", 64, 2), ("num_stages", 2, 1),
           ("block_k", MIN_BLOCK, 2), ("block_n", MIN_BLOCK, 2))
  for field, floor, shrink in steps:
    while (smem_bytes(config, itemsize, num_weights, lhs) > budget
           and getattr(config, field) > floor):
      value = getattr(config, field)
      config = dataclasses.replace(config, **{field: value - 1 if shrink == 1 else value // 2})
  return config


def heuristic(target: device.Target, m: int, n: int, k: int, dtype, gated: bool, *,
              variant: str | None = None, lhs: int = 1, rhs: int | None = None) -> MatmulConfig:
  """`gated`: the gated op (two weights). `variant`: a backward kernel, "dx" (w read
  transposed) or "dw" (x read transposed). `lhs`, `rhs`: operand tiles loaded per K step, for
  the shared-memory fit (default 1 and 1 + gated)."""
  itemsize = jnp.dtype(dtype).itemsize
  smem_limit = target.max_shared_memory_bytes or FALLBACK_SMEM_BYTES
  # Register-heavy kernels take the gated matmul's tiles (shorter K steps on Ampere): two
  # accumulators, four operand tiles per K step (the gated dx: 224 B of spills on sm_80 at
  # 128x128x64), or a transposed x tile (dw: 255 registers and a 4 B spill on sm_80).
  heavy = gated or lhs > 1 or variant == "dw"
  base = _base(target, m, n, itemsize, heavy)
  rhs = (2 if gated else 1) if rhs is None else rhs
  return _fit(base, m, n, k, itemsize, rhs, smem_limit, lhs)


def resolve(explicit: MatmulConfig | None, m: int, n: int, k: int, dtype, gated: bool, *,
            variant: str | None = None, lhs: int = 1, rhs: int | None = None) -> MatmulConfig:
  key = tuning_key(m, n, k, dtype, gated, variant)
  return config_lib.resolve(MatmulConfig, explicit, OP_DIR, key,
                            lambda target: heuristic(target, m, n, k, dtype, gated,
                                                     variant=variant, lhs=lhs, rhs=rhs))


# ---- autotune hook (see `pallas_kernels.autotune`): configs worth timing, best guesses first ----

# Prefill tiles known to do well with Triton on Ampere/Hopper: (block_m, block_n, block_k, warps).
_PREFILL_TILES = ((128, 128, 64, 8), (128, 128, 32, 4), (128, 64, 64, 4), (64, 128, 64, 4),
                  (128, 256, 64, 8), (256, 128, 64, 8), (64, 256, 32, 4), (64, 64, 64, 4))


def _log2_distance(a: int, b: int) -> int:
  return abs(a.bit_length() - b.bit_length())


def candidates(target: device.Target, *args, **kwargs) -> list[MatmulConfig]:
  """Configs for one public call (matmul(x, w, ...) or gated_matmul(x, w_gate, w_up, ...)).

  Decode (M <= 64) keeps the smallest block_m and varies block_n, block_k, stages and warps;
  prefill tries the usual Triton tiles with 3-4 stages. Every candidate fits the target's
  shared memory and holds at most 128 accumulator floats per thread; nearest the heuristic first.
  """
  x = args[0] if args else kwargs["x"]
  w = args[1] if len(args) > 1 else kwargs.get("w", kwargs.get("w_gate"))
  gated = len(args) > 2 or "w_up" in kwargs
  m, k, n = math.prod(x.shape[:-1]), x.shape[-1], w.shape[1]
  itemsize, weights = jnp.dtype(x.dtype).itemsize, 2 if gated else 1
  default = heuristic(target, m, n, k, x.dtype, gated)
  if m <= DECODE_MAX_M:
    grid = [(default.block_m, bn, bk, warps, stages) for bn in (16, 32, 64)
            for bk in (64, 128, 256) for warps in (4, 8) for stages in (2, 3, 4, 5)]
  else:
    grid = [(bm, bn, bk, warps, stages) for bm, bn, bk, warps in _PREFILL_TILES
            for stages in (3, 4)]
  smem_limit = (target.max_shared_memory_bytes or FALLBACK_SMEM_BYTES) - EPILOGUE_RESERVE_BYTES
  found = []
  for bm, bn, bk, warps, stages in grid:
    cfg = _fit(MatmulConfig(bm, bn, bk, default.group_m, warps, stages), m, n, k, itemsize,
               weights, smem_limit=1 << 62)  # clamp to the problem only
    if (smem_bytes(cfg, itemsize, weights) <= smem_limit
        and cfg.block_m * cfg.block_n * weights <= 128 * 32 * cfg.num_warps):
      found.append(cfg)

  def distance(cfg: MatmulConfig) -> int:
    return (sum(_log2_distance(getattr(cfg, f), getattr(default, f))
                for f in ("block_m", "block_n", "block_k", "num_warps"))
            + abs(cfg.num_stages - default.num_stages))

  return list(dict.fromkeys([default] + sorted(found, key=distance)))  # stable: grid order ties
