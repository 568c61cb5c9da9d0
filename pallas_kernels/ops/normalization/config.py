"""Tuning knobs of the normalization kernels: block of rows per program, warps, stages.

The backward kernel (`triton._norm_bwd_rows`) takes the same `NormConfig`: the public ops'
`bwd_config=`, else its own tuning key (kind "rms_bwd" / "layer_bwd"), else its own heuristic
(`bwd_heuristic`). It holds more arrays per element (dy, h, dh and the fp32 dweight/dbias
accumulators), so it uses a quarter of the forward's elements per thread where the row allows.
Its grid is not a config field: `bwd_programs` caps it at a few programs per SM, each looping
over its share of row blocks.

Resolution (explicit > tuned table > heuristic) goes through `_core.config.resolve`.
The kernel holds one block of `block_rows x padded_width` elements of each streamed
array in registers, so the heuristic sizes that block to a fixed element count and
picks warps to keep the count per thread small (16 fp32 values per array: no spills
at width 8192 in fp32 with a residual, see bench/notes/normalization.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device

OP_DIR = Path(__file__).parent

# Widest row (padded to a power of two) one program holds in registers. Wider rows are
# refused by the Triton implementation and dispatch falls back to XLA.
MAX_BLOCK_WIDTH = 16384
# Elements of one streamed array a thread holds; 16 fp32 per array leaves room for
# x, residual, h and weight (and bias) within 255 registers with no spills.
ELEMENTS_PER_THREAD = 16
MAX_WARPS = 16
MAX_BLOCK_ROWS = 64


@dataclasses.dataclass(frozen=True)
class NormConfig:
  block_rows: int  # rows per program, a power of two
  num_warps: int
  num_stages: int  # the kernel has no pipelined loop; kept for the compiler params

  def __post_init__(self):
    for name in ("block_rows", "num_warps", "num_stages"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NormConfig: `{name}` expected a positive int, got {value!r}")
    if self.block_rows & (self.block_rows - 1):
      raise ValueError(f"NormConfig: `block_rows` expected a power of two, got {self.block_rows}")
    if self.num_warps & (self.num_warps - 1) or self.num_warps > 32:
      raise ValueError(f"NormConfig: `num_warps` expected a power of two <= 32, "
                       f"got {self.num_warps}")


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def tuning_key(width: int, dtype, residual: bool, kind: str) -> dict:
  """Width bucket (the padded block width), dtype, fused residual, rms or layer."""
  return {"width": next_power_of_2(width), "dtype": jnp.dtype(dtype).name,
          "residual": bool(residual), "kind": kind}


def heuristic(target: device.Target, width: int) -> NormConfig:
  """Block of ~4k elements (8k on Hopper, to keep more bytes in flight per SM).

  Narrow rows get several rows per program so each program still moves a few KB;
  wide rows get one row and more warps (one warp per 512 elements, at most 16).
  Off-GPU (interpret mode) the same rule keeps the grid short.
  """
  return _tile_config(width, 8192 if target.is_hopper else 4096, ELEMENTS_PER_THREAD)


def _tile_config(width: int, tile_elements: int, elements_per_thread: int) -> NormConfig:
  """Rows of padded width filling ~`tile_elements`, one thread per `elements_per_thread`."""
  block_width = next_power_of_2(width)
  block_rows = min(MAX_BLOCK_ROWS, max(1, tile_elements // block_width))
  threads = block_rows * block_width // elements_per_thread
  num_warps = min(MAX_WARPS, max(1, threads // 32))
  return NormConfig(block_rows=block_rows, num_warps=num_warps, num_stages=1)


def resolve(explicit: NormConfig | None, width: int, dtype, residual: bool,
            kind: str, heuristic_fn=None) -> NormConfig:
  """Explicit, else the tuned table under `kind`, else `heuristic_fn` (default `heuristic`)."""
  key = tuning_key(width, dtype, residual, kind)
  fallback = heuristic_fn or heuristic
  return config_lib.resolve(NormConfig, explicit, OP_DIR, key,
                            lambda target: fallback(target, width))


# --- Backward ------------------------------------------------------------------------------

# Tile of the backward: ~2k elements (one row when wider). Each program loops over several row
# blocks, so bytes in flight per SM come from the resident programs, not from one big tile.
BWD_TILE_ELEMENTS = 2048
# 4 elements of each array per thread where the row allows: the loop keeps dy, h, dh and the
# fp32 dweight (and dbias) accumulators live at once. Offline compile: 32-40 registers at
# 4 per thread, 40-64 at 8 (one fp32 LayerNorm case spilled on sm_80), 100-128 at 16.
BWD_ELEMENTS_PER_THREAD = 4
# Widest padded row the backward kernel takes: at 16384 (32 elements per thread, 16 warps)
# the accumulator plus one row of dy, h and dh need > 128 registers and spill on sm_90.
# Wider rows get the XLA backward (`triton._norm_bwd_xla`).
BWD_MAX_BLOCK_WIDTH = 8192
# Backward programs per SM. Each writes one fp32 partial row of dweight (and dbias), reduced
# afterwards: <= 2 * SMs * D * 4 bytes per vector, a few % of the streams for rows >= 4096.
BWD_PROGRAMS_PER_SM = 2
FALLBACK_NUM_SMS = 108  # off-GPU (interpret mode): an A100's count


def bwd_heuristic(target: device.Target, width: int) -> NormConfig:
  """Tile of ~2k elements (one row when wider), one warp per 128 of them, at most 16."""
  del target  # the same rule on Ampere and Hopper: the grid, not the tile, fills the SMs
  return _tile_config(width, BWD_TILE_ELEMENTS, BWD_ELEMENTS_PER_THREAD)


def resolve_bwd(explicit: NormConfig | None, width: int, dtype, residual: bool,
                kind: str) -> NormConfig:
  """The backward's config: explicit, else the tuned table (kind "<kind>_bwd"), else
  `bwd_heuristic`."""
  return resolve(explicit, width, dtype, residual, f"{kind}_bwd", bwd_heuristic)


def bwd_programs(row_blocks: int, target: device.Target) -> int:
  """Grid of the backward: min(row blocks, BWD_PROGRAMS_PER_SM x SMs) programs."""
  num_sms = target.num_sms or FALLBACK_NUM_SMS
  return max(1, min(row_blocks, BWD_PROGRAMS_PER_SM * num_sms))


# --- Hooks for `python -m pallas_kernels.autotune` (arguments of the public call) ---------

def _kind(op: str) -> str:
  return "rms" if op == "rms_norm" else "layer"


def autotune_key(op: str, x, *args, residual=None, **kwargs) -> dict:
  return tuning_key(x.shape[-1], x.dtype, residual is not None, _kind(op))


def autotune_default(target: device.Target, x, *args, **kwargs) -> NormConfig:
  return heuristic(target, x.shape[-1])


def candidates(target: device.Target, x, *args, **kwargs) -> list[NormConfig]:
  """Tiles of 1k..32k elements, 4..64 elements of each array per thread, nearest the
  heuristic first. num_stages stays 1: the kernel has no loop to pipeline."""
  block_width = next_power_of_2(x.shape[-1])
  default = heuristic(target, x.shape[-1])
  found = []
  for block_rows in (1, 2, 4, 8, 16, 32, 64):
    elements = block_rows * block_width
    if elements > 32768 or (elements < 1024 and block_rows < MAX_BLOCK_ROWS):
      continue
    for num_warps in (1, 2, 4, 8, 16):
      if 4 <= elements // (32 * num_warps) <= 64:
        found.append(NormConfig(block_rows=block_rows, num_warps=num_warps, num_stages=1))

  def distance(cfg: NormConfig) -> tuple:
    log2 = lambda v: v.bit_length()
    return (abs(log2(cfg.block_rows) - log2(default.block_rows))
            + abs(log2(cfg.num_warps) - log2(default.num_warps)), cfg.block_rows, cfg.num_warps)

  return sorted(set(found) | {default}, key=distance)


# Backward (`--pass backward`: GRAD_CASES, candidates passed as `bwd_config=`).

def autotune_bwd_key(op: str, x, *args, residual=None, **kwargs) -> dict | None:
  """`resolve_bwd`'s key; None where the backward runs as XLA ops (no kernel to tune)."""
  if next_power_of_2(x.shape[-1]) > BWD_MAX_BLOCK_WIDTH:
    return None
  return tuning_key(x.shape[-1], x.dtype, residual is not None, f"{_kind(op)}_bwd")


def autotune_bwd_default(target: device.Target, x, *args, **kwargs) -> NormConfig:
  return bwd_heuristic(target, x.shape[-1])


def bwd_candidates(target: device.Target, x, *args, **kwargs) -> list[NormConfig]:
  """Tiles of 512..8k elements (one row when wider), 2..16 elements of each array per thread,
  1..3 stages (the kernel loops over row blocks, so its loads can be pipelined), nearest
  `bwd_heuristic` first."""
  block_width = next_power_of_2(x.shape[-1])
  default = bwd_heuristic(target, x.shape[-1])
  found = []
  for block_rows in (1, 2, 4, 8, 16, 32, 64):
    elements = block_rows * block_width
    if block_rows > 1 and not 512 <= elements <= 8192:
      continue
    for num_warps in (1, 2, 4, 8, 16):
      if 2 <= elements // (32 * num_warps) <= 16:
        found += [NormConfig(block_rows, num_warps, stages) for stages in (1, 2, 3)]

  def distance(cfg: NormConfig) -> tuple:
    log2 = lambda v: v.bit_length()
    return (abs(log2(cfg.block_rows) - log2(default.block_rows))
            + abs(log2(cfg.num_warps) - log2(default.num_warps))
            + abs(cfg.num_stages - default.num_stages),
            cfg.block_rows, cfg.num_warps, cfg.num_stages)

  return sorted(set(found) | {default}, key=distance)
