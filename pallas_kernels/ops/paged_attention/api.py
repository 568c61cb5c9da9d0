"""Public paged decode attention: argument checks, then dispatch ("triton" or "xla").

One new token per sequence attends to its KV cache, stored in fixed-size pages:

  q            `[batch, num_heads, head_dim]`, the token at position `lengths - 1` (its own K/V
               already written to its page by the caller, so it attends to itself);
  k_pages, v_pages `[num_pages, page_size, num_kv_heads, head_dim]`, a pool shared by every
               sequence; `num_heads % num_kv_heads == 0` (MHA, GQA, MQA: query head i reads KV
               head i // (num_heads // num_kv_heads); K/V are never repeated);
  block_tables int32 `[batch, max_pages]`: entry p of row b is the page holding positions
               `p * page_size .. (p + 1) * page_size - 1` of sequence b;
  lengths      int32 `[batch]`, the number of valid positions per sequence (a runtime value).

Key j is visible when `lengths - sliding_window <= j < lengths` (all `j < lengths` without a
window); scores are `q.k * scale` (default head_dim ** -0.5), then `logit_softcap * tanh(s /
logit_softcap)` when given. Table entries of visible positions must lie in [0, num_pages).
Entries past a row's length may hold anything (the engine points them at a scratch page;
out-of-range values such as -1 are clamped to a real page) and never affect the output: those
positions are masked, and the kernel does not even load them. A row with `lengths == 0`
outputs zeros. Lengths are clamped to [0, max_pages * page_size], the table's capacity: a
larger length cannot be rejected here because it is a runtime value. q and the pages share one
float dtype (fp32, bf16 or fp16); the output has q's shape and dtype. Works under jit and vmap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._core import checks, dispatch
from pallas_kernels.ops.paged_attention import reference
from pallas_kernels.ops.paged_attention import triton as triton_impl
from pallas_kernels.ops.paged_attention.config import PagedAttentionConfig

OP = "paged_attention"
_STATIC = ("scale", "sliding_window", "logit_softcap")
_PAGES_LAYOUT = "[num_pages, page_size, num_kv_heads, head_dim]"


@functools.partial(jax.jit, static_argnames=_STATIC)
def _reference_jit(q, k_pages, v_pages, block_tables, lengths, **kwargs):
  return reference.paged_attention(q, k_pages, v_pages, block_tables, lengths, **kwargs)


_IMPLS = (
    dispatch.Implementation("triton", triton_impl.paged_attention, refuses=triton_impl.refuses),
    dispatch.Implementation("xla", _reference_jit, is_pallas=False),
)


def _check_pages(q, k_pages, v_pages) -> None:
  checks.array(OP, "k_pages", k_pages, ndim=4, layout=_PAGES_LAYOUT)
  checks.array(OP, "v_pages", v_pages, ndim=4, layout=_PAGES_LAYOUT)
  checks.same_dtype(OP, ("q", "k_pages", "v_pages"), (q, k_pages, v_pages))
  checks.dim(OP, "k_pages", k_pages, 3, q.shape[2], "head_dim = q.shape[2]")
  checks.shape(OP, "v_pages", v_pages, tuple(k_pages.shape), "the shape of `k_pages`")
  if min(k_pages.shape) < 1:
    raise ValueError(f"{OP}: `k_pages` expected every dimension of {_PAGES_LAYOUT} >= 1, "
                     f"got shape {tuple(k_pages.shape)}")
  num_kv_heads = k_pages.shape[2]
  if q.shape[1] % num_kv_heads:
    raise ValueError(f"{OP}: `q` expected num_heads a multiple of num_kv_heads = {num_kv_heads} "
                     f"(k_pages.shape[2]), got num_heads = {q.shape[1]}")


def _check_table(block_tables, batch: int) -> None:
  checks.array(OP, "block_tables", block_tables, ndim=2, dtypes=None,
                layout="[batch, max_pages]")
  if jnp.dtype(block_tables.dtype) != jnp.int32:
    raise TypeError(f"{OP}: `block_tables` expected dtype int32, got {block_tables.dtype}")
  checks.dim(OP, "block_tables", block_tables, 0, batch, "batch = q.shape[0]")
  if block_tables.shape[1] < 1:
    raise ValueError(f"{OP}: `block_tables` expected max_pages >= 1, "
                     f"got shape {tuple(block_tables.shape)}")


def _check(q, k_pages, v_pages, block_tables, lengths, scale, sliding_window, logit_softcap,
           config) -> None:
  checks.array(OP, "q", q, ndim=3, layout="[batch, num_heads, head_dim]")
  _check_pages(q, k_pages, v_pages)
  _check_table(block_tables, q.shape[0])
  checks.int_vector(OP, "lengths", lengths, q.shape[0])
  checks.decode_options(OP, scale, sliding_window, logit_softcap)
  checks.config_type(OP, config, PagedAttentionConfig)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    impl: str | None = None, interpret: bool = False,
                    config: PagedAttentionConfig | None = None):
  """Attention of one new token per sequence over its paged KV cache; see the module docstring."""
  _check(q, k_pages, v_pages, block_tables, lengths, scale, sliding_window, logit_softcap,
         config)
  return dispatch.call(OP, impl, interpret, _IMPLS, q, k_pages, v_pages, block_tables, lengths,
                       scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
                       config=config)
