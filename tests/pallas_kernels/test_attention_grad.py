"""Attention gradients: dq, dk, dv of every impl against float64 autodiff of the reference.

Every check pulls back a fresh random cotangent (never zeros or ones) through `jax.vjp` of the
public op and compares with the float64 vjp of `reference.attention` on the same rounded
inputs. Blocks are forced small so every case crosses several q and kv tiles in both backward
kernels, with sequence lengths that are not block multiples. Interpret mode compiles each
kernel for each new shape (seconds on a shared CPU): the default cases combine features; the
wider sweep is marked slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import testing
from pallas_kernels.ops.attention import (AttentionBwdConfig, AttentionConfig, attention,
                                          reference)
from pallas_kernels.ops.attention import config_bwd
from pallas_kernels.ops.attention import triton as triton_impl
from pallas_kernels.ops.attention import triton_bwd

SMALL = AttentionConfig(block_q=32, block_k=16, num_warps=4, num_stages=2)
SMALL_BWD = AttentionBwdConfig(block_q_dkv=16, block_k_dkv=16, num_warps_dkv=4, num_stages_dkv=2,
                               block_q_dq=32, block_k_dq=16, num_warps_dq=4, num_stages_dq=2)
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
_STATIC = ("causal", "sliding_window", "logit_softcap", "scale")


def _reference_vjp(q, k, v, do, **kwargs):
  _, pullback = jax.vjp(lambda q, k, v: reference.attention(q, k, v, **kwargs), q, k, v)
  return pullback(do)


# Jitted oracle: one XLA compile per shape instead of one per eager op.
REFERENCE_VJP = jax.jit(_reference_vjp, static_argnames=_STATIC)


def _inputs(seed, *, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype):
  """q, k, v and a random cotangent for the output."""
  kq, kk, kv, kd = testing.keys(seed, 4)
  return (testing.random_normal(kq, (batch, q_len, num_heads, head_dim), dtype),
          testing.random_normal(kk, (batch, kv_len, num_kv_heads, head_dim), dtype),
          testing.random_normal(kv, (batch, kv_len, num_kv_heads, head_dim), dtype),
          testing.random_normal(kd, (batch, q_len, num_heads, head_dim), dtype))


def _op(mode, **kwargs):
  impl, interpret = mode
  return functools.partial(attention, impl=impl, interpret=interpret, config=SMALL,
                           bwd_config=SMALL_BWD, **kwargs)


def _vjp(mode, q, k, v, do, **kwargs):
  out, pullback = jax.vjp(_op(mode, **kwargs), q, k, v)
  return out, pullback(do)


def _assert_grads_close(grads, q, k, v, do, **kwargs):
  refs = testing.float64_reference(REFERENCE_VJP, q, k, v, do, **kwargs)
  group = q.shape[2] // k.shape[2]
  # dq sums over keys; dk, dv over the queries of a whole group.
  reduction_len = max(k.shape[1], q.shape[1] * group)
  for name, grad, ref, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v)):
    assert grad.shape == x.shape and grad.dtype == x.dtype, name
    testing.assert_close(grad, ref, x.dtype, reduction_len=reduction_len, what=name)


# Together with the tests below: causal and not, GQA 1 (the checkpoint test), 2 and 4, head_dim
# 64/80, fp32 and bf16, q_len 1, q_len/kv_len that are not block multiples, scale, softcap,
# window, chunked q_offset.
GRAD_CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, kwargs)
    pytest.param(1, 24, 45, 4, 2, 80, "bf16", {"causal": False}, id="g2-d80-bf16-full"),
    pytest.param(2, 1, 37, 8, 2, 64, "fp32", {"logit_softcap": 5.0, "scale": 0.3},
                 id="g4-d64-fp32-q1-softcap"),
    pytest.param(1, 35, 50, 4, 1, 64, "bf16", {"sliding_window": 9, "logit_softcap": 2.0},
                 id="g4-d64-bf16-window-softcap-chunk"),
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,kwargs", GRAD_CASES)
def test_grads_match_reference(kernel_mode, batch, q_len, kv_len, heads, kv_heads, head_dim,
                               dtype, kwargs):
  q, k, v, do = _inputs(11, batch=batch, q_len=q_len, kv_len=kv_len, num_heads=heads,
                        num_kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPES[dtype])
  _, grads = _vjp(kernel_mode, q, k, v, do, **kwargs)
  _assert_grads_close(grads, q, k, v, do, **kwargs)


def test_ragged_lengths_chunks_and_empty_rows(impl_mode):
  # Row 0 has no key at all; row 1 (length 13, queries at 20..39, window 11) has queries that
  # see keys 10..12 and later ones that see nothing; row 2 is a chunk starting at position 3.
  # Gradients are finite everywhere and exactly zero where no query sees a key.
  q, k, v, do = _inputs(12, batch=3, q_len=20, kv_len=40, num_heads=4, num_kv_heads=2,
                        head_dim=64, dtype=jnp.bfloat16)
  kwargs = dict(lengths=jnp.array([0, 13, 40], jnp.int32),
                q_offset=jnp.array([20, 20, 3], jnp.int32), sliding_window=11)
  _, (dq, dk, dv) = _vjp(impl_mode, q, k, v, do, **kwargs)
  _assert_grads_close((dq, dk, dv), q, k, v, do, **kwargs)
  dq, dk, dv = (np.asarray(g, np.float32) for g in (dq, dk, dv))
  assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
  assert np.all(dq[1, 3:] == 0)  # positions >= 23 see no key below 13 within the window
  assert np.all(dk[1, 13:] == 0) and np.all(dv[1, 13:] == 0)  # keys past the length
  assert np.any(dq[1, :3] != 0) and np.any(dv[1, 10:13] != 0)


def test_value_and_grad_of_vmap_under_jit(kernel_mode):
  # Per-example gradients: vmap over the batch of grad, each example a batch of one.
  q, k, v, do = _inputs(13, batch=2, q_len=17, kv_len=30, num_heads=4, num_kv_heads=1,
                        head_dim=64, dtype=jnp.float16)
  lengths = jnp.array([30, 9], jnp.int32)
  op = _op(kernel_mode)

  def loss(q, k, v, n, do):
    out = op(q[None], k[None], v[None], lengths=n[None])[0]
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
  step = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2))))
  value, grads = step(q, k, v, lengths, do)
  _assert_grads_close(grads, q, k, v, do, lengths=lengths)
  out = testing.float64_reference(jax.jit(reference.attention), q, k, v, lengths=lengths)
  expected = np.sum(out * np.asarray(do, np.float64), axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(value), expected, rtol=2e-2, atol=2e-2)


def _checkpointed_grad(mode, policy, do, **kwargs):
  op = _op(mode, **kwargs)

  def loss(q, k, v):
    return jnp.sum(op(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
  if policy is not None:
    loss = jax.checkpoint(loss, policy=getattr(jax.checkpoint_policies, policy))
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("policy", [
    "nothing_saveable", pytest.param("dots_saveable", marks=pytest.mark.slow)])
def test_grad_under_checkpoint(kernel_mode, policy):
  # Also the plain case: causal MHA in fp32 (tight tolerance), 40 positions over 16/32 tiles.
  q, k, v, do = _inputs(14, batch=2, q_len=40, kv_len=40, num_heads=2, num_kv_heads=2,
                        head_dim=64, dtype=jnp.float32)
  grad = _checkpointed_grad(kernel_mode, policy, do)
  # Remat really recomputes: the forward kernel runs again in the backward pass.
  plain = testing.kernel_names(jax.make_jaxpr(_checkpointed_grad(kernel_mode, None, do))(q, k, v))
  assert plain == ["attention_fwd", "attention_bwd_preprocess", "attention_bwd_dkdv",
                   "attention_bwd_dq"]
  remat = testing.kernel_names(jax.make_jaxpr(grad)(q, k, v))
  assert sorted(remat) == sorted(plain + ["attention_fwd"])
  _assert_grads_close(jax.jit(grad)(q, k, v), q, k, v, do)


def test_reference_gradient_matches_finite_differences():
  # The oracle itself: float64 autodiff of the reference against central differences, with
  # a softcap, a window, ragged lengths (one empty row) and GQA.
  from jax.test_util import check_grads
  q, k, v, _ = _inputs(15, batch=2, q_len=5, kv_len=7, num_heads=4, num_kv_heads=2,
                       head_dim=8, dtype=jnp.float32)
  fn = functools.partial(reference.attention, lengths=jnp.array([0, 6], jnp.int32),
                         sliding_window=4, logit_softcap=3.0)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
    check_grads(jax.jit(fn), args, order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


# ---- kernel internals: the backward kernels skip the tiles the mask rules out.

@functools.cache
def _backward_with_internals(interpret):
  # Causal + window 40 over 96 keys, group 2, lengths 96 and 71: each kv tile is seen by a few
  # q tiles only, and some kv tiles by none.
  q, k, v, do = _inputs(16, batch=2, q_len=70, kv_len=96, num_heads=6, num_kv_heads=3,
                        head_dim=64, dtype=jnp.bfloat16)
  lengths = jnp.array([96, 71], jnp.int32)
  kwargs = dict(causal=True, sliding_window=40, lengths=lengths)
  o, lse = triton_impl.attention(q, k, v, config=SMALL, interpret=interpret, return_lse=True,
                                 **kwargs)
  q_offset = jnp.full((2,), 96 - 70, jnp.int32)
  out = triton_bwd.backward(q, k, v, lengths, q_offset, o, lse, do, causal=True, window=40,
                            softcap=None, scale=64 ** -0.5, cfg=SMALL_BWD, interpret=interpret,
                            count_tiles=True)
  return (q, k, v, do, kwargs), out


def _tile_classes(visible, q_tile: int, k_tile: int):
  """(masked, unmasked) int arrays [q_tiles, kv_tiles]: some / every (query, key) visible."""
  q_len, kv_pad = visible.shape
  masked, unmasked = [], []
  for q0 in range(0, q_len, q_tile):
    block_rows = visible[q0:q0 + q_tile]
    some = [block_rows[:, j:j + k_tile].any() for j in range(0, kv_pad, k_tile)]
    every = [block_rows[:, j:j + k_tile].all() for j in range(0, kv_pad, k_tile)]
    masked.append([s and not e for s, e in zip(some, every)])
    unmasked.append(every)
  return np.array(masked, int), np.array(unmasked, int)


def _visible(length, *, q_len, kv_pad, q_offset, window):
  pos = q_offset + np.arange(q_len)[:, None]
  key = np.arange(kv_pad)[None, :]
  return (key < length) & (key <= pos) & (key > pos - window)


def test_backward_internals_grads(kernel_mode):
  (q, k, v, do, kwargs), (dq, dk, dv, _, _) = _backward_with_internals(kernel_mode[1])
  _assert_grads_close((dq, dk, dv), q, k, v, do, **kwargs)


def test_backward_skips_fully_masked_tiles(kernel_mode):
  (q, k, _, _, kwargs), (*_, dkdv_counts, dq_counts) = _backward_with_internals(kernel_mode[1])
  q_len, kv_len, group = q.shape[1], k.shape[1], 2
  for counts, block_q, block_k, per_kv_tile in (
      (dkdv_counts, SMALL_BWD.block_q_dkv, SMALL_BWD.block_k_dkv, True),
      (dq_counts, SMALL_BWD.block_q_dq, SMALL_BWD.block_k_dq, False)):
    positions, _, block_k = triton_impl.tiles(block_q, block_k, q_len=q_len, kv_len=kv_len,
                                              group=group)
    kv_pad = -(-kv_len // block_k) * block_k
    masked, unmasked = (np.asarray(c) for c in counts)  # [batch, kv_heads, tiles]
    for b, length in enumerate(np.asarray(kwargs["lengths"])):
      visible = _visible(length, q_len=q_len, kv_pad=kv_pad, q_offset=kv_len - q_len,
                         window=kwargs["sliding_window"])
      exp_m, exp_u = _tile_classes(visible, positions, block_k)
      axis = 0 if per_kv_tile else 1  # dk/dv programs count q tiles, dq programs kv tiles
      for h in range(k.shape[2]):
        np.testing.assert_array_equal(masked[b, h], exp_m.sum(axis))
        np.testing.assert_array_equal(unmasked[b, h], exp_u.sum(axis))
      total = exp_m.shape[axis]
      assert (masked[b] + unmasked[b]).max() < total  # something was skipped
    assert unmasked.sum() > 0  # and interior tiles ran without a mask


# ---- configs and errors.

@pytest.mark.parametrize("kind", testing.GPU_KINDS)
def test_bwd_heuristic_fits_shared_memory(kind):
  with testing.abstract_gpu(kind) as target:
    # dk/dv holds two fp32 accumulators: <= 128 registers a thread (the audit checks the whole
    # kernel for spills).
    testing.assert_heuristic_fits(config_bwd, target, max_registers=128)
    resolved = config_bwd.resolve(None, head_dim=128, dtype=jnp.bfloat16, causal=True,
                                  q_len=4096, kv_len=4096)
    assert resolved == config_bwd.heuristic(target, head_dim=128, dtype=jnp.bfloat16)
  key = config_bwd.bwd_tuning_key(head_dim=128, dtype=jnp.bfloat16, causal=True, q_len=3000,
                                  kv_len=3000)
  assert key["pass"] == "backward" and key["q_len"] == 4096


def test_bwd_config_errors():
  with pytest.raises(ValueError, match="`block_k_dkv` expected a power of two"):
    AttentionBwdConfig(16, 48, 4, 2, 32, 16, 4, 2)
  with pytest.raises(ValueError, match="`num_warps_dq` expected one of"):
    AttentionBwdConfig(16, 16, 4, 2, 32, 16, 3, 2)
  q = jnp.zeros((1, 8, 2, 64), jnp.float32)
  with pytest.raises(TypeError, match="`bwd_config` expected AttentionBwdConfig"):
    attention(q, q, q, impl="triton", interpret=True, bwd_config=SMALL)


# ---- slow: GQA ratios 3 and 8, every head_dim, fp16, default configs.

@pytest.mark.slow
@pytest.mark.parametrize("group,head_dim,dtype", [
    (3, 64, "bf16"), (8, 64, "bf16"), (2, 96, "fp16"), (1, 128, "bf16"), (2, 256, "bf16"),
    (4, 128, "fp32")])
def test_sweep_gqa_head_dims_dtypes(group, head_dim, dtype):
  q, k, v, do = _inputs(group * head_dim, batch=1, q_len=50, kv_len=67, num_heads=2 * group,
                        num_kv_heads=2, head_dim=head_dim, dtype=DTYPES[dtype])
  kwargs = dict(lengths=jnp.array([60], jnp.int32))
  _, grads = _vjp(("triton", True), q, k, v, do, **kwargs)
  _assert_grads_close(grads, q, k, v, do, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_default_configs_larger_shapes(dtype):
  q, k, v, do = _inputs(17, batch=1, q_len=300, kv_len=300, num_heads=4, num_kv_heads=2,
                        head_dim=128, dtype=DTYPES[dtype])
  kwargs = dict(sliding_window=100, logit_softcap=20.0)
  fn = functools.partial(attention, impl="triton", interpret=True, **kwargs)
  _, pullback = jax.vjp(fn, q, k, v)
  _assert_grads_close(pullback(do), q, k, v, do, **kwargs)


@pytest.mark.slow
@given(data=st.data())
@settings(max_examples=4, deadline=None)
def test_property_random_shapes_grad(data):
  # Random tile edges, groups, windows, lengths and chunk offsets for the backward tile ranges.
  draw = data.draw
  group = draw(st.sampled_from([1, 2, 3, 4]))
  q_len = draw(st.integers(1, 40))
  kv_len = draw(st.integers(1, 48))
  causal = draw(st.booleans())
  window = draw(st.one_of(st.none(), st.integers(1, 24))) if causal else None
  kwargs = dict(causal=causal, sliding_window=window,
                lengths=jnp.array([draw(st.integers(0, kv_len)), kv_len], jnp.int32),
                q_offset=jnp.array([draw(st.integers(0, kv_len)), kv_len - q_len], jnp.int32))
  q, k, v, do = _inputs(draw(st.integers(0, 2**16)), batch=2, q_len=q_len, kv_len=kv_len,
                        num_heads=group, num_kv_heads=1, head_dim=64, dtype=jnp.float32)
  _, grads = _vjp(("triton", True), q, k, v, do, **kwargs)
  _assert_grads_close(grads, q, k, v, do, **kwargs)
