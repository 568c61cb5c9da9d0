"""Tuning knobs of the attention kernel, the heuristic that picks them, and the tuning key.

`block_q` counts *rows of the q tile*, i.e. query positions × padded group size (the M
dimension of both MMAs): under GQA one tile holds `block_q // group_pad` positions of every
query head that shares a kv head. Registers and shared memory depend on rows, not positions,
so one config serves MHA, GQA and MQA alike.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import jax.numpy as jnp

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device

OP_DIR = Path(__file__).parent
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  block_q: int     # rows of the q tile: query positions × padded group size (power of two)
  block_k: int     # keys per kv tile (power of two)
  num_warps: int
  num_stages: int  # software-pipelining depth of the K/V tile loads

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < _MIN_DOT or value & (value - 1):
        raise ValueError(f"AttentionConfig: `{name}` expected a power of two >= {_MIN_DOT}, "
                         f"got {value!r}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"AttentionConfig: `num_warps` expected one of (1, 2, 4, 8, 16), "
                       f"got {self.num_warps!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"AttentionConfig: `num_stages` expected a positive int, "
                       f"got {self.num_stages!r}")


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
  """Triton tiles need power-of-two sides: 80 and 96 run as 128 (masked loads, zero fill)."""
  return max(_MIN_DOT, next_pow2(head_dim))


def shared_memory_bytes(cfg: AttentionConfig, head_dim: int, dtype) -> int:
  """Upper estimate of the kernel's shared memory.

  Per pipeline stage one K and one V tile [block_k, head_dim_pad]; the Q tile
  [block_q, head_dim_pad] (Hopper's wgmma reads its A operand from shared memory); and one
  [block_q, block_k] buffer for the layout change of P between the two MMAs. The offline
  audit reads the real number from the cubin; this one only has to be conservative.
  """
  item = jnp.dtype(dtype).itemsize
  d_pad = padded_head_dim(head_dim)
  kv = cfg.num_stages * 2 * cfg.block_k * d_pad * item
  return kv + cfg.block_q * d_pad * item + cfg.block_q * cfg.block_k * item


# (sm major, head_dim_pad) -> (block_q, block_k, num_warps, num_stages) for 2-byte dtypes.
# Starting points from FlashAttention-2 and the Triton fused-attention tutorial, sized so that
# the fp32 accumulator [block_q, head_dim_pad] costs <= 64 registers a thread
# (block_q * head_dim_pad / (32 * num_warps)): head_dim 256 gets a 64-row tile and 8 warps so it
# does not spill, and a 32-key tile on Ampere to stay well inside 163 KB.
_TABLE = {
    (8, 64): (128, 64, 4, 3),
    (8, 128): (128, 32, 8, 3),
    (8, 256): (64, 32, 8, 2),
    (9, 64): (128, 64, 4, 3),
    (9, 128): (128, 64, 8, 3),
    (9, 256): (64, 64, 8, 2),
}


# fp32 inputs take IEEE fp32 dots on the FMA units (no tensor cores, no silent TF32), which
# need far more registers: a small tile. fp32 is the correctness path, not the fast one.
_FP32 = {64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (32, 16, 8, 2)}


def heuristic(target: device.Target, *, head_dim: int, dtype) -> AttentionConfig:
  """A config for `target` that fits its shared memory; non-GPU targets (interpret) get Ampere's."""
  cfg = AttentionConfig(*table_row(_TABLE, _FP32, target, head_dim=head_dim, dtype=dtype))
  # Never expected with the tables above; a guard for smaller cards (99 KB on sm_86/sm_89).
  return shrink_to_fit(cfg, target, lambda c: shared_memory_bytes(c, head_dim, dtype), _shrink)


def _shrink(cfg: AttentionConfig) -> AttentionConfig:
  if cfg.num_stages > 2:
    return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
  for name in ("block_k", "block_q"):
    if getattr(cfg, name) > _MIN_DOT:
      return dataclasses.replace(cfg, **{name: getattr(cfg, name) // 2})
  return cfg


def table_row(table: dict, fp32_table: dict, target: device.Target, *, head_dim: int,
              dtype) -> tuple:
  """The heuristic's starting row: `fp32_table[head_dim_pad]` for fp32, else
  `table[(sm major, head_dim_pad)]`, head_dim_pad clamped to [64, 256]; non-GPU targets
  (interpret) read Ampere's row. The backward config shares this."""
  d_pad = max(64, min(256, padded_head_dim(head_dim)))
  if jnp.dtype(dtype) == jnp.float32:
    return fp32_table[d_pad]
  return table[(9 if target.is_hopper else 8, d_pad)]


def shared_memory_budget(target: device.Target) -> int:
  """Shared memory a block may use on `target`; the A100's 163 KB where it is unknown."""
  return target.max_shared_memory_bytes or 163 * 1024


def shrink_to_fit(cfg, target: device.Target, size, shrink):
  """`cfg` shrunk one `shrink(cfg)` step at a time until `size(cfg)` fits the target's shared
  memory, or until `shrink` returns it unchanged (nothing left to shrink)."""
  budget = shared_memory_budget(target)
  while size(cfg) > budget:
    smaller = shrink(cfg)
    if smaller == cfg:
      break
    cfg = smaller
  return cfg


def length_bucket(n: int) -> int:
  """Power-of-two bucket of a sequence length, clamped to [16, 65536]."""
  return min(65536, max(16, next_pow2(n)))


def tuning_key(*, head_dim: int, dtype, causal: bool, q_len: int, kv_len: int) -> dict:
  return {"head_dim": int(head_dim), "dtype": jnp.dtype(dtype).name, "causal": bool(causal),
          "q_len": length_bucket(q_len), "kv_len": length_bucket(kv_len)}


def resolve(explicit: AttentionConfig | None, *, head_dim: int, dtype, causal: bool, q_len: int,
            kv_len: int) -> AttentionConfig:
  """Explicit config, else the tuned table of the current device, else the heuristic."""
  key = tuning_key(head_dim=head_dim, dtype=dtype, causal=causal, q_len=q_len, kv_len=kv_len)
  return config_lib.resolve(AttentionConfig, explicit, OP_DIR, key,
                            lambda target: heuristic(target, head_dim=head_dim, dtype=dtype))


def accumulator_registers(cfg: AttentionConfig, head_dim: int) -> int:
  """fp32 accumulator registers per thread: block_q * head_dim_pad / threads."""
  return cfg.block_q * padded_head_dim(head_dim) // (32 * cfg.num_warps)


def candidates(target: device.Target, q, k, v, **kwargs) -> list[AttentionConfig]:
  """Autotune hook: the heuristic first, then configs that fit shared memory and leave the
  accumulator <= 128 registers a thread, nearest to the heuristic first."""
  del k, v, kwargs
  head_dim, dtype = q.shape[-1], q.dtype
  default = heuristic(target, head_dim=head_dim, dtype=dtype)
  budget = shared_memory_budget(target)
  found = []
  for bq, bk, warps, stages in itertools.product((32, 64, 128, 256), (16, 32, 64, 128), (4, 8),
                                                 (2, 3, 4)):
    cfg = AttentionConfig(bq, bk, warps, stages)
    if (cfg != default and shared_memory_bytes(cfg, head_dim, dtype) <= budget
        and accumulator_registers(cfg, head_dim) <= 128):
      found.append(cfg)

  def distance(c):  # steps of x2 per power-of-two field, plus the stage difference
    steps = sum(abs(getattr(c, f).bit_length() - getattr(default, f).bit_length())
                for f in ("block_q", "block_k", "num_warps"))
    return steps + abs(c.num_stages - default.num_stages)
  return [default, *sorted(found, key=distance)]
