"""Tuning knobs of the flash-decoding kernel: key block, key-axis splits, warps, stages.

Resolution (explicit > tuned table > heuristic) goes through `_core.config.resolve`.
Decode attention reads every visible K/V row once and does ~2 FLOPs per byte: it is bound by
memory bandwidth, so the knobs serve two goals only. (1) Enough programs to fill every SM:
the grid is (batch, kv_heads, num_splits) and a batch-1 request with 8 KV heads is 8 programs
on a 132-SM H100 unless the key axis is split. (2) Enough bytes in flight per program: a K and
a V tile of ~16 KB each per pipeline stage. See bench/notes/decode_attention.md.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import jax.numpy as jnp

from pallas_kernels._core import device

OP_DIR = Path(__file__).parent

# One K (or V) tile of `block_k` rows is about this many bytes: 64 rows of bf16 head_dim 128.
TILE_BYTES = 16 * 1024
MIN_BLOCK_K = 16   # tl.dot needs N >= 16 for the [group, block_k] score tile
MAX_BLOCK_K = 128
# A split must stream at least this many keys, or its fixed cost (loading q, filling the
# pipeline, writing a [group, head_dim] fp32 partial) stops being small next to its K/V reads.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 256
# Programs per SM the heuristic aims for: two resident programs of ~64-96 KB shared memory
# each on H100/A100, i.e. one full wave; more splits only add partials to combine.
PROGRAMS_PER_SM = 2
# Without a GPU (interpret mode) there is no SM count; this keeps interpreted grids short.
INTERPRET_SMS = 4


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
  block_k: int     # keys per loop step, a power of two >= 16
  num_splits: int  # programs along the key axis per (batch, kv_head); clamped to the block count
  num_warps: int
  num_stages: int  # software-pipelining depth of the K/V loads in the key loop

  def __post_init__(self):
    for name in ("block_k", "num_splits", "num_warps", "num_stages"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DecodeAttentionConfig: `{name}` expected a positive int, got {value!r}")
    if self.block_k < MIN_BLOCK_K or self.block_k & (self.block_k - 1):
      raise ValueError(f"DecodeAttentionConfig: `block_k` expected a power of two "
                       f">= {MIN_BLOCK_K}, got {self.block_k}")
    if self.num_warps & (self.num_warps - 1) or self.num_warps > 16:
      raise ValueError(f"DecodeAttentionConfig: `num_warps` expected a power of two <= 16, "
                       f"got {self.num_warps}")


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def tuning_key(*, head_dim: int, dtype, group: int, num_kv_heads: int, max_len: int,
               batch: int) -> dict:
  """Exact head_dim, dtype, group and KV heads; power-of-two buckets of max_len and batch.

  `num_kv_heads` is in the key because the split count depends on batch * kv_heads: a
  Llama-3-70B tensor-parallel shard (1 KV head) needs 8x the splits of Llama-3-8B (8 KV heads).
  """
  return {"head_dim": int(head_dim), "dtype": jnp.dtype(dtype).name, "group": int(group),
          "num_kv_heads": int(num_kv_heads), "max_len": next_power_of_2(max_len),
          "batch": next_power_of_2(batch)}


def block_k_for(head_dim: int, dtype) -> int:
  """About TILE_BYTES per K tile: 128 keys at head_dim 64 bf16, 64 at 128, 32 at 256."""
  row_bytes = next_power_of_2(head_dim) * jnp.dtype(dtype).itemsize
  block_k = TILE_BYTES // row_bytes
  return max(MIN_BLOCK_K, min(MAX_BLOCK_K, next_power_of_2(block_k)))


def num_splits_for(num_sms: int, *, batch: int, num_kv_heads: int, max_len: int,
                   block_k: int) -> int:
  """Enough splits that batch * kv_heads * splits fills PROGRAMS_PER_SM waves of the GPU,
  but no split shorter than MIN_KEYS_PER_SPLIT keys of max_len (nor than one block)."""
  programs = batch * num_kv_heads
  wanted = cdiv(PROGRAMS_PER_SM * num_sms, programs)
  longest = max(1, max_len // max(MIN_KEYS_PER_SPLIT, block_k))
  return max(1, min(wanted, longest, MAX_SPLITS))


def heuristic(target: device.Target, *, batch: int, num_kv_heads: int, max_len: int,
              head_dim: int, dtype) -> DecodeAttentionConfig:
  block_k = block_k_for(head_dim, dtype)
  num_sms = target.num_sms or INTERPRET_SMS
  num_splits = num_splits_for(num_sms, batch=batch, num_kv_heads=num_kv_heads, max_len=max_len,
                              block_k=block_k)
  # Offline sm_90 cubins use 70 KB of shared memory at 3 stages (16 KB K + 16 KB V tiles):
  # 3 programs fit in Hopper's 227 KB. Ampere's 163 KB gets 2 stages (38 KB, 4 programs).
  num_stages = 3 if target.is_hopper else 2
  return DecodeAttentionConfig(block_k=block_k, num_splits=num_splits, num_warps=4,
                               num_stages=num_stages)


def _call_sizes(q, k_cache) -> dict:
  batch, _, head_dim = q.shape
  return dict(batch=batch, num_kv_heads=k_cache.shape[2], max_len=k_cache.shape[1],
              head_dim=head_dim, dtype=q.dtype)


def candidates(target: device.Target, q, k_cache, *args, **kwargs) -> list[DecodeAttentionConfig]:
  """Autotune hook: configs around the heuristic, nearest first (fields changed, then order).

  Splits x0.5 / x1 / x2 (the wave-filling guess is the thing most worth checking), block_k
  halved / doubled, 2-4 stages, 4 or 8 warps. Arrays may be ShapeDtypeStructs.
  """
  del args, kwargs
  base = heuristic(target, **_call_sizes(q, k_cache))
  axes = (
      ("num_splits", (base.num_splits, max(1, base.num_splits // 2),
                      min(MAX_SPLITS, 2 * base.num_splits))),
      ("block_k", tuple(b for b in (base.block_k, base.block_k // 2, 2 * base.block_k)
                        if MIN_BLOCK_K <= b <= MAX_BLOCK_K)),
      ("num_stages", (base.num_stages, 2, 3, 4)),
      ("num_warps", (base.num_warps, 8, 4)),
  )
  axes = tuple((name, tuple(dict.fromkeys(values))) for name, values in axes)
  combos = itertools.product(*(range(len(values)) for _, values in axes))
  return [DecodeAttentionConfig(**{name: values[i] for i, (name, values) in zip(combo, axes)})
          for combo in sorted(combos, key=lambda c: (sum(i > 0 for i in c), sum(c)))]
