"""Decode attention shapes from real models, and the peers the GPU benchmark compares against.

Every case is one decode step: q `[batch, heads, head_dim]` against a bf16 KV cache of
`max_len` rows. Lengths are deterministic so that `bytes_moved` is exact: batch 1 uses the whole
cache; larger batches are ragged, from max_len down to just above max_len / 2 (the engine's
length buckets leave caches partly empty). `bytes_moved` counts the K and V rows actually read
(the visible ones) plus q, the output and lengths; `flops` is 4 * heads * head_dim per visible
key (q.k and p.v, two FLOPs per multiply-add).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._core.specs import Case

OP = "decode_attention"


def case_lengths(batch: int, max_len: int) -> np.ndarray:
  """max_len for the first row, then evenly down towards max_len / 2."""
  step = max_len // (2 * batch)
  return np.array([max_len - b * step for b in range(batch)], np.int32)


def _make_inputs(key, *, batch, num_heads, num_kv_heads, head_dim, max_len, dtype, lengths):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, num_heads, head_dim), jnp.float32).astype(dtype)
  cache_shape = (batch, max_len, num_kv_heads, head_dim)
  k_cache = jax.random.normal(kk, cache_shape, jnp.float32).astype(dtype)
  v_cache = jax.random.normal(kv, cache_shape, jnp.float32).astype(dtype)
  return q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32)


def make_case(model: str, *, num_heads: int, num_kv_heads: int, head_dim: int, batch: int,
              max_len: int, dtype=jnp.bfloat16, sliding_window: int | None = None,
              logit_softcap: float | None = None, audit: bool = False) -> Case:
  lengths = case_lengths(batch, max_len)
  visible = np.minimum(lengths, sliding_window) if sliding_window else lengths
  keys = int(visible.sum())
  itemsize = jnp.dtype(dtype).itemsize
  kv_bytes = 2 * keys * num_kv_heads * head_dim * itemsize
  qo_bytes = 2 * batch * num_heads * head_dim * itemsize + 4 * batch
  kwargs = {}
  extras = []
  if sliding_window is not None:
    kwargs["sliding_window"] = sliding_window
    extras.append(f"window {sliding_window}")
  if logit_softcap is not None:
    kwargs["logit_softcap"] = logit_softcap
    extras.append(f"softcap {logit_softcap:g}")
  ctx = f"{max_len // 1024}k" if max_len % 1024 == 0 else str(max_len)
  label = (f"{model} decode b{batch} ctx {ctx} {num_heads}/{num_kv_heads}x{head_dim} "
           f"{jnp.dtype(dtype).name}" + "".join(f" {e}" for e in extras))
  make = functools.partial(_make_inputs, batch=batch, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, max_len=max_len,
                           dtype=dtype, lengths=lengths)
  return Case(op=OP, label=label, make_inputs=make, kwargs=kwargs,
              flops=4.0 * num_heads * head_dim * keys, bytes_moved=float(kv_bytes + qo_bytes),
              audit=audit)


_K = 1024
SMOLLM2 = dict(num_heads=9, num_kv_heads=3, head_dim=64)          # SmolLM2-135M
LLAMA3_8B = dict(num_heads=32, num_kv_heads=8, head_dim=128)      # Llama-3-8B
MISTRAL_7B = dict(num_heads=32, num_kv_heads=8, head_dim=128)     # Mistral-7B (v0.1: window 4096)
LLAMA3_70B_TP8 = dict(num_heads=8, num_kv_heads=1, head_dim=128)  # Llama-3-70B, 1/8 tensor shard

CASES: list[Case] = [
    make_case("smollm2-135m", **SMOLLM2, batch=1, max_len=8 * _K),
    make_case("smollm2-135m", **SMOLLM2, batch=64, max_len=2 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=1, max_len=1 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=1, max_len=8 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=1, max_len=32 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=1, max_len=128 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=8, max_len=8 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=16, max_len=32 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=64, max_len=1 * _K),
    make_case("llama3-8b", **LLAMA3_8B, batch=64, max_len=4 * _K),
    make_case("mistral-7b", **MISTRAL_7B, batch=1, max_len=32 * _K, sliding_window=4096),
    make_case("mistral-7b", **MISTRAL_7B, batch=16, max_len=8 * _K, sliding_window=4096),
    make_case("mistral-7b", **MISTRAL_7B, batch=32, max_len=4 * _K),
    make_case("llama3-70b-tp8", **LLAMA3_70B_TP8, batch=1, max_len=128 * _K),
    make_case("llama3-70b-tp8", **LLAMA3_70B_TP8, batch=8, max_len=32 * _K),
    make_case("llama3-70b-tp8", **LLAMA3_70B_TP8, batch=64, max_len=4 * _K),
    # Small representative shapes for the offline audit (lowered and compiled, never run).
    make_case("audit smollm2", **SMOLLM2, batch=2, max_len=1000, dtype=jnp.float16, audit=True),
    make_case("audit llama3", **LLAMA3_8B, batch=2, max_len=4 * _K, audit=True),
    make_case("audit mistral", **MISTRAL_7B, batch=2, max_len=4 * _K, sliding_window=1024,
              audit=True),
    make_case("audit mqa", num_heads=8, num_kv_heads=1, head_dim=128, batch=1, max_len=2 * _K,
              dtype=jnp.float16, audit=True),
    make_case("audit gemma2-like", num_heads=16, num_kv_heads=8, head_dim=256, batch=2,
              max_len=2 * _K, logit_softcap=50.0, audit=True),
    make_case("audit mha hd80", num_heads=8, num_kv_heads=8, head_dim=80, batch=2, max_len=1000,
              audit=True),
]


# ---- peers for the GPU benchmark: same (q, k_cache, v_cache, lengths, **kwargs) -------------

def _scale(q, scale):
  return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _xla_peer(q, k_cache, v_cache, lengths, **kwargs):
  from pallas_kernels.ops.decode_attention import reference
  return jax.jit(functools.partial(reference.decode_attention, **kwargs))(
      q, k_cache, v_cache, lengths)


def _jax_pallas_splits(max_len: int) -> tuple[int, int]:
  """(k_splits, block_k) satisfying jax's gqa: max_len = k_splits * split, split % block_k == 0."""
  for k_splits in (16, 8, 4, 2, 1):
    split = max_len // k_splits
    if max_len % k_splits or split < 16:
      continue
    for block_k in (128, 64, 32, 16):
      if split % block_k == 0:
        return k_splits, block_k
  raise NotImplementedError(f"jax-pallas gqa: max_len {max_len} has no valid split")


def _jax_pallas_peer(q, k_cache, v_cache, lengths, *, scale=None, sliding_window=None,
                     logit_softcap=None):
  """jax.experimental.pallas.ops.gpu.decode_attention.gqa: same [B, T, KV, D] cache layout;
  kv_seq_len is our lengths, start_idx expresses the window; it has no softcap."""
  if logit_softcap is not None:
    raise NotImplementedError("jax-pallas gqa has no logit softcap")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
  k_splits, block_k = _jax_pallas_splits(k_cache.shape[1])
  start_idx = None if sliding_window is None else jnp.maximum(lengths - sliding_window, 0)
  return jax_decode.gqa(q, k_cache, v_cache, start_idx=start_idx, kv_seq_len=lengths,
                        sm_scale=_scale(q, scale), k_splits=k_splits, block_k=block_k)


def _cudnn_peer(q, k_cache, v_cache, lengths, *, scale=None, sliding_window=None,
                logit_softcap=None):
  """cuDNN flash attention with a query length of 1; key lengths via key_value_seq_lengths.
  cuDNN's window is relative to the query's own index (0 here), so no decode window."""
  if sliding_window is not None or logit_softcap is not None:
    raise NotImplementedError("cudnn peer: no decode sliding window or softcap")
  fn = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=_scale(q, scale),
                                 implementation="cudnn"))
  return fn(q[:, None], k_cache, v_cache, key_value_seq_lengths=lengths)[:, 0]


def _tokamax_peer(q, k_cache, v_cache, lengths, *, scale=None, sliding_window=None,
                  logit_softcap=None):
  import tokamax  # only where installed

  mask = None
  if sliding_window is not None:
    pos = jnp.arange(k_cache.shape[1])
    mask = (pos[None, :] >= (lengths - sliding_window)[:, None])[:, None, None, :]
  fn = jax.jit(functools.partial(tokamax.dot_product_attention, scale=_scale(q, scale),
                                 logits_soft_cap=logit_softcap))
  return fn(q[:, None], k_cache, v_cache, mask=mask, key_value_seq_lengths=lengths)[:, 0]


def peers() -> dict[str, Callable]:
  """Other implementations of the same call, for the GPU benchmark. Imports are lazy; a peer
  that cannot run a case raises NotImplementedError."""
  out = {"xla": _xla_peer, "jax-pallas": _jax_pallas_peer, "cudnn": _cudnn_peer}
  try:
    import tokamax  # noqa: F401
  except ImportError:
    return out
  out["tokamax"] = _tokamax_peer
  return out
