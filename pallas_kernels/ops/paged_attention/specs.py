"""Paged decode attention shapes from real models, and the peers the GPU benchmark compares against.

Every case is one decode step over a bf16 page pool laid out as an engine leaves it: each
sequence owns `cdiv(length, page_size)` pages scattered over the pool in random order, page 0
is the scratch page that table entries past a sequence's length point at. Lengths are decode
attention's (`case_lengths`: batch 1 fills its table, larger batches are ragged down to about
half), so `bytes_moved` counts the same visible K and V rows plus the table entries read.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._core.specs import Case
from pallas_kernels.ops.decode_attention import specs as decode_specs
from pallas_kernels.ops.decode_attention.specs import (LLAMA3_8B, LLAMA3_70B_TP8, MISTRAL_7B,
                                                       SMOLLM2)

OP = "paged_attention"
SCRATCH_PAGE = 0


def page_slots(lengths: np.ndarray, page_size: int, max_pages: int) -> np.ndarray:
  """`[batch, max_pages]` index of each used table slot among all used slots, -1 past a length."""
  used = -(-lengths // page_size)
  slot = np.arange(max_pages)[None, :]
  first = np.concatenate([[0], np.cumsum(used)[:-1]])[:, None]
  return np.where(slot < used[:, None], first + slot, -1).astype(np.int32)


def _make_inputs(key, *, batch, num_heads, num_kv_heads, head_dim, max_len, page_size, dtype,
                 lengths):
  """q, k_pages, v_pages, block_tables, lengths; the used pages are a random permutation of
  pages 1.. of the pool."""
  max_pages = -(-max_len // page_size)
  slots = page_slots(lengths, page_size, max_pages)
  num_pages = 1 + int(slots.max()) + 1
  kq, kk, kv, kp = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, num_heads, head_dim), jnp.float32).astype(dtype)
  pool_shape = (num_pages, page_size, num_kv_heads, head_dim)
  k_pages = jax.random.normal(kk, pool_shape, jnp.float32).astype(dtype)
  v_pages = jax.random.normal(kv, pool_shape, jnp.float32).astype(dtype)
  pages = 1 + jax.random.permutation(kp, num_pages - 1).astype(jnp.int32)
  tables = jnp.where(slots >= 0, pages[np.maximum(slots, 0)], SCRATCH_PAGE)
  return q, k_pages, v_pages, tables, jnp.asarray(lengths, jnp.int32)


def make_case(model: str, *, num_heads: int, num_kv_heads: int, head_dim: int, batch: int,
              max_len: int, page_size: int = 16, dtype=jnp.bfloat16,
              sliding_window: int | None = None, logit_softcap: float | None = None,
              audit: bool = False) -> Case:
  dense = decode_specs.make_case(model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, batch=batch, max_len=max_len, dtype=dtype,
                                 sliding_window=sliding_window, logit_softcap=logit_softcap,
                                 audit=audit)
  lengths = decode_specs.case_lengths(batch, max_len)
  first = np.maximum(lengths - sliding_window, 0) if sliding_window else 0 * lengths
  table_bytes = 4 * int((-(-lengths // page_size) - first // page_size).sum())  # pages touched
  make = functools.partial(_make_inputs, batch=batch, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, max_len=max_len,
                           page_size=page_size, dtype=dtype, lengths=lengths)
  label = dense.label.replace(" decode ", f" paged{page_size} decode ", 1)
  return Case(op=OP, label=label, make_inputs=make, kwargs=dense.kwargs, flops=dense.flops,
              bytes_moved=dense.bytes_moved + table_bytes, audit=audit)


_K = 1024

# Decode attention's benchmark shapes, paged (16-row pages unless said), and one larger page.
# (model, its heads, batch, context in K positions, extra make_case arguments)
_BENCH = [
    ("smollm2-135m", SMOLLM2, 1, 8, {}),
    ("smollm2-135m", SMOLLM2, 64, 2, {}),
    *(("llama3-8b", LLAMA3_8B, batch, ctx, {})
      for batch, ctx in ((1, 1), (1, 8), (1, 32), (1, 128), (8, 8), (16, 32), (64, 4))),
    ("llama3-8b", LLAMA3_8B, 8, 8, {"page_size": 64}),
    ("mistral-7b", MISTRAL_7B, 1, 32, {"sliding_window": 4096}),
    ("mistral-7b", MISTRAL_7B, 32, 4, {}),
    *(("llama3-70b-tp8", LLAMA3_70B_TP8, batch, ctx, {})
      for batch, ctx in ((1, 128), (8, 32), (64, 4))),
]

CASES: list[Case] = [
    *(make_case(model, **heads, batch=batch, max_len=ctx * _K, **extra)
      for model, heads, batch, ctx, extra in _BENCH),
    # Small representative shapes for the offline audit (lowered and compiled, never run).
    make_case("audit smollm2", **SMOLLM2, batch=2, max_len=1000, dtype=jnp.float16, audit=True),
    make_case("audit llama3", **LLAMA3_8B, batch=2, max_len=4 * _K, audit=True),
    make_case("audit llama3", **LLAMA3_8B, batch=2, max_len=4 * _K, page_size=32,
              audit=True),
    make_case("audit llama3 long", **LLAMA3_8B, batch=1, max_len=32 * _K, audit=True),
    make_case("audit mistral", **MISTRAL_7B, batch=2, max_len=4 * _K, sliding_window=1024,
              audit=True),
    make_case("audit mqa", num_heads=8, num_kv_heads=1, head_dim=128, batch=1,
              max_len=2 * _K, page_size=8, dtype=jnp.float16, audit=True),
    make_case("audit gemma2-like", num_heads=16, num_kv_heads=8, head_dim=256, batch=2,
              max_len=2 * _K, logit_softcap=50.0, audit=True),
    make_case("audit mha hd80", num_heads=8, num_kv_heads=8, head_dim=80, batch=2, max_len=1000,
              audit=True),
]


# ---- peers for the GPU benchmark: same (q, k_pages, v_pages, block_tables, lengths, **kwargs) -
# The bench times the whole peer call (there is no untimed setup step), so a peer that needs the
# pool in another layout pays for converting it; such a peer is offered only where the
# conversion is free.

def _xla_peer(q, k_pages, v_pages, block_tables, lengths, **kwargs):
  from pallas_kernels.ops.paged_attention import reference
  return jax.jit(functools.partial(reference.paged_attention, **kwargs))(
      q, k_pages, v_pages, block_tables, lengths)


def _gather_then_decode_peer(q, k_pages, v_pages, block_tables, lengths, **kwargs):
  """What an engine without a paged kernel does each step: gather the pages into the dense
  cache (timed: it is the cost paging in the kernel avoids), then our dense decode kernel."""
  from pallas_kernels.ops.decode_attention import decode_attention
  from pallas_kernels.ops.paged_attention import reference
  return decode_attention(q, reference.gather_pages(k_pages, block_tables),
                          reference.gather_pages(v_pages, block_tables), lengths, **kwargs)


def _jax_pallas_splits(max_pages: int) -> tuple[int, int]:
  """(k_splits, pages_per_compute_block) satisfying jax's divisibility asserts."""
  k_splits = next(s for s in (16, 8, 4, 2, 1) if max_pages % s == 0)
  per_split = max_pages // k_splits
  return k_splits, next(b for b in (8, 4, 2, 1) if per_split % b == 0)


def _jax_pallas_peer(q, k_pages, v_pages, block_tables, lengths, *, scale=None,
                     sliding_window=None, logit_softcap=None):
  """jax.experimental.pallas.ops.gpu.paged_attention: pool `[kv_heads, num_pages, page_size,
  head_dim]`, a free reshape of ours only with one KV head; no scale (q is pre-scaled), no
  window."""
  if sliding_window is not None:
    raise NotImplementedError("jax-pallas paged_attention has no sliding window")
  if k_pages.shape[2] != 1:
    raise NotImplementedError("jax-pallas paged_attention: pool layout [kv_heads, pages, ...]; "
                              "converting ours would be timed")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
  k_splits, pages_per_block = _jax_pallas_splits(block_tables.shape[1])
  q_scaled = q * jnp.asarray(q.shape[-1] ** -0.5 if scale is None else scale, q.dtype)
  to_jax = lambda pages: pages.reshape(1, *pages.shape[:2], pages.shape[3])
  return jax_paged.paged_attention(
      q_scaled, to_jax(k_pages), to_jax(v_pages), block_tables, lengths, k_splits=k_splits,
      pages_per_compute_block=pages_per_block, attn_logits_soft_cap=logit_softcap)


def peers() -> dict[str, Callable]:
  """Other implementations of the same call, for the GPU benchmark. Imports are lazy; a peer
  that cannot run a case raises NotImplementedError."""
  return {"xla": _xla_peer, "gather+decode": _gather_then_decode_peer,
          "jax-pallas": _jax_pallas_peer}
