"""Attention shapes from real models (prefill), and the benchmark's peer implementations.

Every case runs with the default `q_offset = kv_len - q_len`; a case whose q_len < kv_len is
a chunk of a longer prefill (chunked prefill). FLOPs count only visible (query, key) pairs:
4 * batch * num_heads * head_dim * pairs (two matmuls of 2 FLOPs per multiply-add). Bytes are
the floor: q, k, v read once and o written once.

GRAD_CASES are training shapes for the backward kernels: their inputs end with a random
cotangent of the output (keyword "cotangent", see `bind`), and the audit and the benchmark
run them as `_core.specs.grad_of(attention)`: forward plus vjp, as in a training step.
Their FLOPs are forward + backward, 14 * batch * num_heads * head_dim * pairs: the forward's 2
matmuls and the backward's 5 (S = QK^T recomputed, dP = dO V^T, dV, dK, dQ), the usual
FlashAttention-2 convention (backward = 2.5x forward). Our deterministic backward executes 7
(S and dP twice: once for dk/dv, once for dq); the extra work is not counted as useful.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._core.specs import Case

OP = "attention"


def visible_pairs(q_len: int, kv_len: int, *, causal: bool = True,
                  sliding_window: int | None = None) -> int:
  """Number of (query, key) pairs the mask lets through, queries at kv_len - q_len onwards."""
  if not causal:
    return q_len * kv_len
  pos = np.arange(kv_len - q_len, kv_len, dtype=np.int64)
  hi = np.minimum(pos + 1, kv_len)
  lo = np.maximum(pos - sliding_window + 1, 0) if sliding_window else np.zeros_like(pos)
  return int(np.maximum(hi - lo, 0).sum())


def _make(key, *, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, q_len, num_heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
  return q, k, v



def _case(label, *, batch, q_len, kv_len=None, num_heads, num_kv_heads, head_dim,
          dtype=jnp.bfloat16, causal=True, sliding_window=None, logit_softcap=None,
          audit=False) -> Case:
  kv_len = q_len if kv_len is None else kv_len
  kwargs = {"causal": causal}
  if sliding_window is not None:
    kwargs["sliding_window"] = sliding_window
  if logit_softcap is not None:
    kwargs["logit_softcap"] = logit_softcap
  pairs = visible_pairs(q_len, kv_len, causal=causal, sliding_window=sliding_window)
  item = jnp.dtype(dtype).itemsize
  return Case(
      op=OP, label=label,
      make_inputs=functools.partial(_make, batch=batch, q_len=q_len, kv_len=kv_len,
                                    num_heads=num_heads, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, dtype=dtype),
      kwargs=kwargs,
      flops=4.0 * batch * num_heads * head_dim * pairs,
      bytes_moved=float(item * batch * head_dim * (2 * q_len * num_heads
                                                    + 2 * kv_len * num_kv_heads)),
      audit=audit)


SMOLLM2 = dict(num_heads=9, num_kv_heads=3, head_dim=64)       # SmolLM2-135M
LLAMA3_8B = dict(num_heads=32, num_kv_heads=8, head_dim=128)   # Llama-3-8B
MISTRAL_7B = dict(num_heads=32, num_kv_heads=8, head_dim=128)  # Mistral-7B-v0.1, window 4096
LLAMA3_70B_TP8 = dict(num_heads=8, num_kv_heads=1, head_dim=128)  # 64/8 heads over 8 GPUs
GEMMA2_9B = dict(num_heads=16, num_kv_heads=8, head_dim=256)   # window 4096, softcap 50
PHI3_MINI = dict(num_heads=32, num_kv_heads=32, head_dim=96)   # MHA, head_dim 96 (padded)

CASES: list[Case] = [
    _case("smollm2-135m prefill 512 causal fp16", batch=8, q_len=512, dtype=jnp.float16,
          audit=True, **SMOLLM2),
    _case("smollm2-135m prefill 2k causal bf16", batch=4, q_len=2048, **SMOLLM2),
    _case("llama3-8b prefill 512 causal bf16", batch=8, q_len=512, audit=True, **LLAMA3_8B),
    _case("llama3-8b prefill 4k causal bf16", batch=1, q_len=4096, **LLAMA3_8B),
    _case("llama3-8b prefill 16k causal bf16", batch=1, q_len=16384, **LLAMA3_8B),
    _case("llama3-8b chunked prefill 2k of 8k causal bf16", batch=1, q_len=2048, kv_len=8192,
          **LLAMA3_8B),
    _case("mistral-7b prefill 2k window 4096 bf16", batch=2, q_len=2048, sliding_window=4096,
          audit=True, **MISTRAL_7B),
    _case("mistral-7b prefill 16k window 4096 bf16", batch=1, q_len=16384,
          sliding_window=4096, **MISTRAL_7B),
    _case("llama3-70b tp8 prefill 8k causal bf16", batch=1, q_len=8192, **LLAMA3_70B_TP8),
    _case("gemma2-9b prefill 1k window 4096 softcap 50 bf16", batch=2, q_len=1024,
          sliding_window=4096, logit_softcap=50.0, audit=True, **GEMMA2_9B),
    _case("gemma2-9b prefill 8k window 4096 softcap 50 bf16", batch=1, q_len=8192,
          sliding_window=4096, logit_softcap=50.0, **GEMMA2_9B),
    _case("phi3-mini prefill 1k causal bf16", batch=2, q_len=1024, audit=True, **PHI3_MINI),
]


# ----------------------------------------------------------------------------------------------
# Backward (training): forward + vjp with a random output cotangent.

def _make_grad(key, **shape):
  q, k, v = _make(key, **shape)
  cotangent = jax.random.normal(jax.random.fold_in(key, 1), q.shape, jnp.float32)
  return q, k, v, cotangent.astype(q.dtype)


def _grad_case(label, *, batch, q_len, num_heads, num_kv_heads, head_dim, dtype=jnp.bfloat16,
               causal=True, sliding_window=None, logit_softcap=None, audit=False) -> Case:
  fwd = _case(label, batch=batch, q_len=q_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
              head_dim=head_dim, dtype=dtype, causal=causal, sliding_window=sliding_window,
              logit_softcap=logit_softcap)
  item = jnp.dtype(dtype).itemsize
  q_elems, kv_elems = batch * q_len * num_heads * head_dim, batch * q_len * num_kv_heads * head_dim
  rows = batch * q_len * num_heads
  # Backward floor: read q, k, v, o, dO, write dq, dk, dv; lse written by the forward and read
  # back, delta written and read (fp32 per row).
  bwd_bytes = item * (4 * q_elems + 4 * kv_elems) + 4 * 4 * rows
  return Case(
      op=OP, label=f"grad {label}",
      make_inputs=functools.partial(_make_grad, batch=batch, q_len=q_len, kv_len=q_len,
                                    num_heads=num_heads, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, dtype=dtype),
      kwargs=fwd.kwargs,
      flops=fwd.flops * 3.5,
      bytes_moved=fwd.bytes_moved + bwd_bytes,
      audit=audit,
      array_kwargs=("cotangent",))


GEMMA_LIKE_D256 = dict(num_heads=16, num_kv_heads=8, head_dim=256)

GRAD_CASES: list[Case] = [
    _grad_case("smollm2-135m train 2k causal bf16", batch=4, q_len=2048, audit=True,
               **SMOLLM2),
    _grad_case("llama3-8b train 4k causal bf16", batch=1, q_len=4096, audit=True, **LLAMA3_8B),
    _grad_case("llama3-8b train 8k causal bf16", batch=1, q_len=8192, **LLAMA3_8B),
    _grad_case("llama3-8b train 16k causal bf16", batch=1, q_len=16384, **LLAMA3_8B),
    _grad_case("mistral-7b train 8k window 4096 bf16", batch=1, q_len=8192,
               sliding_window=4096, audit=True, **MISTRAL_7B),
    _grad_case("gemma2-9b-shape train 4k causal bf16", batch=1, q_len=4096, audit=True,
               **GEMMA_LIKE_D256),
    _grad_case("gemma2-9b train 4k window 4096 softcap 50 bf16", batch=1, q_len=4096,
               sliding_window=4096, logit_softcap=50.0, **GEMMA2_9B),
]


# ----------------------------------------------------------------------------------------------
# Peers for the GPU benchmark: same (q, k, v, **case.kwargs) call. Import lazily: they need a GPU.

def _unsupported(name: str, **kwargs) -> None:
  bad = {k: v for k, v in kwargs.items() if v is not None}
  if bad:
    raise NotImplementedError(f"{name} peer does not support {sorted(bad)}")


_ATTENTION_STATICS = ("causal", "sliding_window", "logit_softcap", "scale")


@functools.cache
def _xla_jit():
  from pallas_kernels.ops.attention import reference
  return jax.jit(reference.attention, static_argnames=_ATTENTION_STATICS)


def _xla_peer(q, k, v, **kwargs):
  return _xla_jit()(q, k, v, **kwargs)


def _top_left_causal_only(name: str, q, k, causal: bool) -> None:
  # jax.nn.dot_product_attention and jax's Pallas mha align the causal diagonal top-left;
  # ours is bottom-right (q_offset = kv_len - q_len). Same only when q_len == kv_len.
  if causal and q.shape[1] != k.shape[1]:
    raise NotImplementedError(f"{name} peer: causal with q_len != kv_len aligns differently")


@functools.cache
def _jax_nn_jit():
  return jax.jit(jax.nn.dot_product_attention,
                 static_argnames=("scale", "is_causal", "local_window_size", "implementation"))


def _cudnn_peer(q, k, v, *, causal=True, sliding_window=None, logit_softcap=None, scale=None):
  """cuDNN flash attention; GQA native (k/v with fewer heads). No softcap."""
  _unsupported("cudnn", logit_softcap=logit_softcap)
  _top_left_causal_only("cudnn", q, k, causal)
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return _jax_nn_jit()(q, k, v, scale=scale, is_causal=causal, local_window_size=window,
                       implementation="cudnn")


@functools.cache
def _jax_pallas_jit(group: int, sm_scale: float, causal: bool):
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

  @jax.jit
  def run(q, k, v):
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    return jax_attention.mha(q, k, v, None, sm_scale=sm_scale, causal=causal)
  return run


def _jax_pallas_peer(q, k, v, *, causal=True, sliding_window=None, logit_softcap=None,
                     scale=None):
  """jax.experimental.pallas.ops.gpu.attention.mha. It has no GQA: K/V are repeated to
  num_heads inside the timed function (extra HBM traffic our kernel does not pay), and it
  needs sequence lengths that are multiples of its blocks (128). No window, no softcap."""
  _unsupported("jax-pallas", sliding_window=sliding_window, logit_softcap=logit_softcap)
  _top_left_causal_only("jax-pallas", q, k, causal)
  sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _jax_pallas_jit(q.shape[2] // k.shape[2], sm_scale, causal)(q, k, v)


@functools.cache
def _tokamax_jit():
  import tokamax
  return jax.jit(tokamax.dot_product_attention,
                 static_argnames=("scale", "is_causal", "local_window_size"))


def _tokamax_peer(q, k, v, *, causal=True, sliding_window=None, logit_softcap=None, scale=None):
  """tokamax.dot_product_attention (jax.nn-like signature; GQA native). No softcap here."""
  _unsupported("tokamax", logit_softcap=logit_softcap)
  _top_left_causal_only("tokamax", q, k, causal)
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return _tokamax_jit()(q, k, v, scale=scale, is_causal=causal, local_window_size=window)


def peers() -> dict[str, Callable]:
  """Implementations the GPU benchmark compares against, by name."""
  found = {"xla": _xla_peer, "cudnn": _cudnn_peer, "jax-pallas": _jax_pallas_peer}
  if importlib.util.find_spec("tokamax") is not None:
    found["tokamax"] = _tokamax_peer
  return found
