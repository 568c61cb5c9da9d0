"""impl="mosaic" gradients: the Hopper backward (`mosaic_bwd.py`) in Mosaic GPU interpret mode,
that `jax.grad` really runs it, and its CUDA lowering.

dq, dk, dv pull back a fresh random cotangent and are compared with float64 autodiff of the
reference on the same rounded inputs (relative Frobenius error; NaN never passes, and the
interpreter leaves unwritten output as NaN: `test_attention_mosaic.
test_interpreter_poisons_unwritten_output`). The interpreter models SMEM, barriers and TMA, so
the ring protocol is exercised too: a barrier phase some waiter misses, or a slot refilled
before both consumers released it, fails. It is slow (seconds per kernel on one core): shapes
are small; the default tiles (128 keys per dk/dv program in 64-row q tiles, 128 query rows per
dq program in 64- or 128-key tiles) still cross several tiles and wrap the rings.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import testing
from pallas_kernels._core import device
from pallas_kernels.ops.attention import attention, mosaic, mosaic_bwd, reference
from tests.pallas_kernels.test_attention_grad import _inputs

FWD = mosaic.MosaicAttentionConfig(block_kv=64, num_stages=2)
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}
H100 = "NVIDIA H100 80GB HBM3"
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=[
             pytest.mark.gpu, pytest.mark.skipif(not device.current_target().is_hopper,
                                                 reason="needs a Hopper GPU")])]


def _reference_vjp(q, k, v, do, **kwargs):
  _, pullback = jax.vjp(lambda q, k, v: reference.attention(q, k, v, **kwargs), q, k, v)
  return pullback(do)


REFERENCE_VJP = jax.jit(_reference_vjp,
                        static_argnames=("causal", "sliding_window", "logit_softcap", "scale"))


def _op(interpret=True, **kwargs):
  return functools.partial(attention, impl="mosaic", interpret=interpret, config=FWD, **kwargs)


def _assert_grads_close(grads, q, k, v, do, **kwargs):
  refs = testing.float64_reference(REFERENCE_VJP, q, k, v, do, **kwargs)
  # dq sums over keys; dk, dv over the queries of a whole group.
  reduction_len = max(k.shape[1], q.shape[1] * (q.shape[2] // k.shape[2]))
  for name, grad, ref, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v)):
    assert grad.shape == x.shape and grad.dtype == x.dtype, name
    testing.assert_close(grad, ref, x.dtype, reduction_len=reduction_len, what=name)


def _kernel_backward(q, k, v, do, *, cfg, causal=True, lengths=None, q_offset=None,
                     sliding_window=None, logit_softcap=None, scale=None):
  """The Mosaic forward, then `mosaic_bwd.backward` with an explicit config."""
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  lengths = jnp.full((batch,), kv_len, jnp.int32) if lengths is None else lengths
  q_offset = jnp.full((batch,), kv_len - q_len, jnp.int32) if q_offset is None else q_offset
  static = dict(causal=causal, window=sliding_window, softcap=logit_softcap,
                scale=head_dim ** -0.5 if scale is None else scale, interpret=True)
  o, lse = mosaic.forward(q, k, v, lengths, q_offset, cfg=FWD, **static)
  return mosaic_bwd.backward(q, k, v, lengths, q_offset, o, lse, do, cfg=cfg, **static)


# Together: GQA 1, 2, 3, 8; head_dim 64 and 128; bf16 and fp16; causal and not; q_len / kv_len
# that are tile multiples and ones that are not (a partial q tile, a dq program whose second
# consumer has no rows, partial kv tiles); q_len < kv_len (bottom-right causal alignment).
GRAD_CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, kwargs)
    pytest.param(1, 128, 192, 2, 1, 64, "bf16", {}, id="g2-d64-bf16-causal-aligned"),
    pytest.param(1, 70, 150, 3, 1, 128, "fp16", {"causal": False},
                 id="g3-d128-fp16-full-ragged"),
    pytest.param(1, 64, 128, 2, 2, 128, "bf16", {}, id="mha-d128-bf16-causal-aligned",
                 marks=pytest.mark.slow),
    pytest.param(1, 50, 130, 8, 1, 64, "bf16", {"causal": False}, id="g8-d64-bf16-full-q50",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,kwargs", GRAD_CASES)
def test_grads_match_reference(interpret, batch, q_len, kv_len, heads, kv_heads, head_dim,
                               dtype, kwargs):
  q, k, v, do = _inputs(21, batch=batch, q_len=q_len, kv_len=kv_len, num_heads=heads,
                        num_kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPES[dtype])
  _, pullback = jax.vjp(_op(interpret, **kwargs), q, k, v)
  _assert_grads_close(pullback(do), q, k, v, do, **kwargs)


@pytest.mark.parametrize("interpret", MODES)
def test_ragged_lengths_offsets_window_softcap(interpret):
  # Row 0 has no key (zero gradients, not NaN); row 1's length 13 lies inside the first tile and
  # its queries at 5.. see a window of 11 (later queries see nothing); row 2 starts at position 0
  # of 130 keys. Keys past `lengths` hold large finite garbage: masked, so their dk, dv are
  # exactly zero and they change nothing else.
  q, k, v, do = _inputs(22, batch=3, q_len=50, kv_len=130, num_heads=2, num_kv_heads=1,
                        head_dim=64, dtype=jnp.bfloat16)
  lengths = jnp.array([0, 13, 130], jnp.int32)
  past = (jnp.arange(130)[None, :] >= lengths[:, None])[:, :, None, None]
  k, v = (jnp.where(past, x * 1000, x).astype(x.dtype) for x in (k, v))
  kwargs = dict(lengths=lengths, q_offset=jnp.array([20, 5, 0], jnp.int32), sliding_window=11,
                logit_softcap=4.0)
  _, pullback = jax.vjp(_op(interpret, **kwargs), q, k, v)
  dq, dk, dv = pullback(do)
  _assert_grads_close((dq, dk, dv), q, k, v, do, **kwargs)
  dq, dk, dv = (np.asarray(g, np.float32) for g in (dq, dk, dv))
  assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
  assert np.all(dq[1, 18:] == 0)  # positions >= 23 see no key below 13 within the window
  assert np.all(dk[1, 13:] == 0) and np.all(dv[1, 13:] == 0)
  assert np.any(dq[1, :18] != 0) and np.any(dv[1, 2:13] != 0)


@pytest.mark.slow
def test_value_and_grad_of_vmap_under_jit():
  # Per-example gradients: vmap over the batch of grad (plgpu.kernel's batching rule adds a grid
  # axis to both backward kernels), each example a batch of one.
  q, k, v, do = _inputs(26, batch=2, q_len=17, kv_len=30, num_heads=4, num_kv_heads=1,
                        head_dim=64, dtype=jnp.float16)
  lengths = jnp.array([30, 9], jnp.int32)
  op = _op()

  def loss(q, k, v, n, do):
    out = op(q[None], k[None], v[None], lengths=n[None])[0]
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
  _, grads = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2))))(q, k, v, lengths, do)
  _assert_grads_close(grads, q, k, v, do, lengths=lengths)


# ---- the Mosaic backward is what runs.


def _grad_fn(impl, **kwargs):
  def loss(q, k, v, do):
    out = attention(q, k, v, impl=impl, interpret=True, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("kwargs", [{}, {"causal": False, "logit_softcap": 3.0},
                                    {"sliding_window": 7, "lengths": jnp.array([9], jnp.int32)}])
def test_grad_runs_the_mosaic_backward_not_triton(kwargs):
  args = _inputs(23, batch=1, q_len=24, kv_len=40, num_heads=4, num_kv_heads=2, head_dim=64,
                 dtype=jnp.bfloat16)
  calls = testing.kernel_names(jax.make_jaxpr(_grad_fn("mosaic", **kwargs))(*args))
  assert calls == ["attention_fwd_mosaic", "attention_bwd_dkdv_mosaic",
                   "attention_bwd_dq_mosaic"], calls
  # The Triton path, for contrast: its three backward kernels.
  calls = testing.kernel_names(jax.make_jaxpr(_grad_fn("triton", **kwargs))(*args))
  assert calls == ["attention_fwd", "attention_bwd_preprocess", "attention_bwd_dkdv",
                   "attention_bwd_dq"], calls


def test_refuses_only_what_the_forward_refuses():
  for dtype, head_dim in ((jnp.bfloat16, 64), (jnp.float16, 128)):
    assert mosaic_bwd.refuses(jnp.zeros((1, 8, 2, head_dim), dtype)) is None
  assert "float32" in mosaic_bwd.refuses(jnp.zeros((1, 8, 2, 64), jnp.float32))
  assert "head_dim" in mosaic_bwd.refuses(jnp.zeros((1, 8, 2, 96), jnp.bfloat16))


def test_config_validation_and_heuristic_fits():
  with pytest.raises(ValueError, match="`block_q_dkv` expected 64 or 128"):
    mosaic_bwd.MosaicAttentionBwdConfig(block_q_dkv=32)
  with pytest.raises(ValueError, match="`block_kv_dq` expected a multiple of 64"):
    mosaic_bwd.MosaicAttentionBwdConfig(block_kv_dq=96)
  with pytest.raises(ValueError, match="`num_stages_dq` expected an int >= 2"):
    mosaic_bwd.MosaicAttentionBwdConfig(num_stages_dq=1)
  for head_dim in (64, 128):
    for dtype in (jnp.bfloat16, jnp.float16):
      cfg = mosaic_bwd.heuristic(head_dim)
      assert max(mosaic_bwd.shared_memory_bytes(cfg, head_dim, dtype)) <= 227 * 1024, cfg


# ---- other tiles, through the kernel entry point.

@pytest.mark.slow
@pytest.mark.parametrize("cfg", [
    mosaic_bwd.MosaicAttentionBwdConfig(block_q_dkv=128, num_stages_dkv=2, block_kv_dq=128,
                                        num_stages_dq=3),
    mosaic_bwd.MosaicAttentionBwdConfig(block_q_dkv=64, num_stages_dkv=4, block_kv_dq=64,
                                        num_stages_dq=2),
], ids=["bq128-bkv128", "bq64x4-bkv64x2"])
def test_other_tiles(cfg):
  q, k, v, do = _inputs(24, batch=2, q_len=200, kv_len=260, num_heads=4, num_kv_heads=2,
                        head_dim=64, dtype=jnp.bfloat16)
  kwargs = dict(lengths=jnp.array([260, 190], jnp.int32), sliding_window=150)
  grads = _kernel_backward(q, k, v, do, cfg=cfg, **kwargs)
  _assert_grads_close(grads, q, k, v, do, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sweep_gqa_and_head_dims(group, head_dim):
  q, k, v, do = _inputs(group * head_dim, batch=1, q_len=130, kv_len=200, num_heads=group,
                        num_kv_heads=1, head_dim=head_dim, dtype=jnp.bfloat16)
  kwargs = dict(q_offset=jnp.array([40], jnp.int32))  # a chunk in the middle of the keys
  _, pullback = jax.vjp(_op(**kwargs), q, k, v)
  _assert_grads_close(pullback(do), q, k, v, do, **kwargs)


@pytest.mark.slow
def test_no_races_detected():
  # The interpreter's race detector on both kernels: causal, wrapping rings, GQA 2.
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # private: no public API
  q, k, v, do = _inputs(25, batch=1, q_len=128, kv_len=256, num_heads=2, num_kv_heads=1,
                        head_dim=64, dtype=jnp.bfloat16)
  n, off = jnp.array([256], jnp.int32), jnp.array([128], jnp.int32)
  static = dict(causal=True, window=None, softcap=None, scale=0.125)
  o, lse = mosaic.forward(q, k, v, n, off, cfg=FWD, interpret=True, **static)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    grads = mosaic_bwd.backward(q, k, v, n, off, o, lse, do, cfg=mosaic_bwd.heuristic(64),
                                interpret=False, **static)
    jax.block_until_ready(grads)
  assert not interpret_pallas_call.get_races().races_found
  _assert_grads_close(grads, q, k, v, do, scale=0.125)


# ---- offline CUDA lowering: the gradient lowers to three Mosaic GPU kernels, no Triton.

def _lower_grad_for_h100(head_dim, **kwargs):
  q = jax.ShapeDtypeStruct((1, 1024, 8, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1000, 2, head_dim), jnp.bfloat16)
  with testing.abstract_gpu(H100, 132):
    return jax.jit(_grad_fn_compiled(**kwargs)).trace(q, kv, kv, q).lower(
        lowering_platforms=("cuda",)).as_text()


def _grad_fn_compiled(**kwargs):
  def loss(q, k, v, do):
    out = attention(q, k, v, impl="mosaic", **kwargs)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def test_grad_lowers_for_h100_to_mosaic_gpu_only():
  text = _lower_grad_for_h100(128, causal=True, logit_softcap=30.0)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 3  # forward, dk/dv, dq
  assert "__gpu$xla.gpu.triton" not in text


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grad_lowers_for_h100_every_variant(head_dim):
  text = _lower_grad_for_h100(head_dim, causal=True, sliding_window=256,
                              lengths=jnp.full((1,), 900, jnp.int32))
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 3
  assert "__gpu$xla.gpu.triton" not in text


def _lower_backward_for_h100(cfg, head_dim=128):
  q = jax.ShapeDtypeStruct((1, 1024, 8, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1000, 2, head_dim), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1,), jnp.int32)
  lse = jax.ShapeDtypeStruct((1, 1024, 8), jnp.float32)
  fn = functools.partial(mosaic_bwd.backward, causal=True, window=None, softcap=None,
                         scale=0.1, cfg=cfg, interpret=False)
  with testing.abstract_gpu(H100, 132):
    return jax.jit(fn).trace(q, kv, kv, rows, rows, q, lse, q).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.slow
def test_shared_memory_estimate_matches_the_lowering():
  # The lowering refuses a kernel over 227 KB and reports its size: our estimate equals it.
  # dk/dv lowers first, so an oversized dk/dv reports itself; a fitting dk/dv with an oversized
  # dq reports the dq kernel.
  for cfg, kernel in ((mosaic_bwd.MosaicAttentionBwdConfig(64, 5, 64, 2), 0),
                      (mosaic_bwd.MosaicAttentionBwdConfig(128, 3, 64, 2), 0),
                      (mosaic_bwd.MosaicAttentionBwdConfig(64, 2, 128, 3), 1)):
    with pytest.raises(ValueError, match=r"exceeds available shared memory") as err:
      _lower_backward_for_h100(cfg)
    actual = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    assert mosaic_bwd.shared_memory_bytes(cfg, 128, jnp.bfloat16)[kernel] == actual, cfg
  # Just under the budget (226.2 and 226.1 KB), and the defaults: they lower.
  for cfg, head_dim in ((mosaic_bwd.MosaicAttentionBwdConfig(64, 4, 128, 2), 128),
                        (mosaic_bwd.heuristic(128), 128), (mosaic_bwd.heuristic(64), 64)):
    assert max(mosaic_bwd.shared_memory_bytes(cfg, head_dim, jnp.bfloat16)) <= 232448
    assert _lower_backward_for_h100(cfg, head_dim).count("custom_call @mosaic_gpu") == 2
