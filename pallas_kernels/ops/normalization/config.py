"""Tuning knobs of the normalization kernels: block of rows per program, warps, stages.

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
  block_width = next_power_of_2(width)
  elements = 8192 if target.is_hopper else 4096
  block_rows = min(MAX_BLOCK_ROWS, max(1, elements // block_width))
  threads = block_rows * block_width // ELEMENTS_PER_THREAD
  num_warps = min(MAX_WARPS, max(1, threads // 32))
  return NormConfig(block_rows=block_rows, num_warps=num_warps, num_stages=1)


def resolve(explicit: NormConfig | None, width: int, dtype, residual: bool,
            kind: str) -> NormConfig:
  key = tuning_key(width, dtype, residual, kind)
  return config_lib.resolve(NormConfig, explicit, OP_DIR, key,
                            lambda target: heuristic(target, width))


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
