"""impl="mosaic": the Hopper forward (Mosaic GPU) in Mosaic GPU interpret mode, its gradient
through the Triton backward, its refusals, and its CUDA lowering.

Every output is compared with a float64 evaluation of the reference on fresh random inputs
(relative Frobenius error, NaN never passes; the interpreter leaves unwritten output as NaN,
see `test_interpreter_poisons_unwritten_output`). The interpreter models SMEM, barriers and
TMA, so the producer/consumer protocol itself is exercised, not only the arithmetic: a barrier
phase a thread skips, or a slot refilled before release, fails. It is slow (a few seconds per
call on one core): shapes are small, 64-key tiles force several kv tiles and a wrapping ring.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import testing
from pallas_kernels._core import device, dispatch
from pallas_kernels.ops.attention import api, attention, mosaic, reference

SMALL = mosaic.MosaicAttentionConfig(block_kv=64, num_stages=2)  # ping-pong on (the default)
NO_PINGPONG = mosaic.MosaicAttentionConfig(block_kv=64, num_stages=3, pingpong=False)
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}
_STATIC = ("causal", "sliding_window", "logit_softcap", "scale")
REFERENCE = jax.jit(reference.attention, static_argnames=_STATIC)
REFERENCE_WITH_LSE = jax.jit(reference.attention_with_lse, static_argnames=_STATIC)
H100 = "NVIDIA H100 80GB HBM3"
# Interpret mode here; the compiled kernel on a Hopper GPU (skipped, visibly, without one).
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=[
             pytest.mark.gpu, pytest.mark.skipif(not device.current_target().is_hopper,
                                                 reason="needs a Hopper GPU")])]


def _inputs(seed, *, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype, cot=False):
  kq, kk, kv, kd = testing.keys(seed, 4)
  arrays = [testing.random_normal(kq, (batch, q_len, num_heads, head_dim), dtype),
            testing.random_normal(kk, (batch, kv_len, num_kv_heads, head_dim), dtype),
            testing.random_normal(kv, (batch, kv_len, num_kv_heads, head_dim), dtype)]
  if cot:  # a random cotangent for the output
    arrays.append(testing.random_normal(kd, (batch, q_len, num_heads, head_dim), dtype))
  return arrays


def _mosaic(q, k, v, config=SMALL, interpret=True, **kwargs):
  return attention(q, k, v, impl="mosaic", interpret=interpret, config=config, **kwargs)


# Together: GQA 1, 3, 8; head_dim 64 and 128; bf16 and fp16; causal and not; q_len/kv_len that
# are block multiples and ones that are not (a partial q tile, a q tile whose second consumer
# has no rows, a partial kv tile); q_len < kv_len (bottom-right causal alignment); the ring with
# and without the ping-pong barrier, 2 and 3 stages.
MATCH_CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, kwargs)
    pytest.param(2, 128, 192, 2, 2, 64, "bf16", {}, id="mha-d64-bf16-causal-aligned"),
    pytest.param(1, 128, 256, 3, 1, 128, "bf16", {"causal": False},
                 id="g3-d128-bf16-full-aligned"),
    pytest.param(1, 100, 150, 3, 1, 128, "fp16", {}, id="g3-d128-fp16-causal-ragged"),
    pytest.param(1, 50, 130, 8, 1, 64, "bf16", {"causal": False, "config": NO_PINGPONG},
                 id="g8-d64-bf16-full-q50-nopingpong"),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,kwargs", MATCH_CASES)
def test_matches_reference(interpret, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype,
                           kwargs):
  q, k, v = _inputs(1, batch=batch, q_len=q_len, kv_len=kv_len, num_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPES[dtype])
  kwargs = dict(kwargs)
  out = _mosaic(q, k, v, interpret=interpret, config=kwargs.pop("config", SMALL), **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  ref = testing.float64_reference(REFERENCE, q, k, v, **kwargs)
  testing.assert_close(out, ref, q.dtype, reduction_len=kv_len)


@pytest.mark.parametrize("interpret", MODES)
def test_ragged_lengths_offsets_window_and_lse(interpret):
  # Row 0 has no key (zeros, lse -inf); row 1's length 13 is inside the first tile and its
  # queries at 5.. see a window of 11; row 2 starts at position 0 (q_offset) of 130 keys.
  q, k, v = _inputs(2, batch=3, q_len=50, kv_len=130, num_heads=4, num_kv_heads=2,
                    head_dim=64, dtype=jnp.bfloat16)
  kwargs = dict(lengths=jnp.array([0, 13, 130], jnp.int32),
                q_offset=jnp.array([20, 5, 0], jnp.int32), sliding_window=11)
  out, lse = mosaic.attention(q, k, v, config=SMALL, interpret=interpret, return_lse=True,
                              **kwargs)
  ref_out, ref_lse = testing.float64_reference(REFERENCE_WITH_LSE, q, k, v, **kwargs)
  testing.assert_close(out, ref_out, q.dtype, reduction_len=k.shape[1])
  assert np.all(np.asarray(out[0], np.float32) == 0.0)
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  lse = np.asarray(lse)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))  # exactly the empty rows
  seen = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[seen], ref_lse[seen], rtol=1e-4, atol=1e-4)


def test_softcap_scale_lengths_fp16_default_blocks():
  # The heuristic config (128-key tiles, 3 stages at head_dim 64); a length inside tile 1.
  q, k, v = _inputs(3, batch=1, q_len=64, kv_len=200, num_heads=2, num_kv_heads=2,
                    head_dim=64, dtype=jnp.float16)
  kwargs = dict(causal=False, logit_softcap=5.0, scale=0.3, lengths=jnp.array([77], jnp.int32))
  out = _mosaic(q, k, v, config=None, **kwargs)
  ref = testing.float64_reference(REFERENCE, q, k, v, **kwargs)
  testing.assert_close(out, ref, q.dtype, reduction_len=k.shape[1])


def test_non_finite_cache_rows_past_lengths_do_not_leak():
  # Stale or poisoned rows past `lengths` (inf keys, NaN values) must not reach the output or
  # the gradients: the kernels mask scores, so the public op zeroes those rows first.
  q, k, v, do = _inputs(7, batch=2, q_len=20, kv_len=70, num_heads=2, num_kv_heads=1,
                        head_dim=64, dtype=jnp.bfloat16, cot=True)
  lengths = jnp.array([33, 70], jnp.int32)
  past = jnp.arange(70)[None, :, None, None] >= lengths[:, None, None, None]
  k_bad, v_bad = jnp.where(past, jnp.inf, k), jnp.where(past, jnp.nan, v)
  fn = functools.partial(_mosaic, config=SMALL, lengths=lengths)
  out, pullback = jax.vjp(fn, q, k_bad, v_bad)
  dq, dk, dv = pullback(do)
  testing.assert_close(out, testing.float64_reference(REFERENCE, q, k, v, lengths=lengths),
                       q.dtype, reduction_len=70)
  ref_dq, _, _ = testing.float64_reference(
      functools.partial(_reference_vjp, lengths=lengths), q, k, v, do)
  testing.assert_close(dq, ref_dq, q.dtype, reduction_len=70)
  for grad in (dk, dv):
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    assert np.all(np.asarray(jnp.where(past, grad, 0), np.float32) == 0.0)


def test_jit_of_vmap():
  # vmap over the batch (each example a batch of one): plgpu.kernel's vmap rule adds a grid axis.
  q, k, v = _inputs(6, batch=2, q_len=17, kv_len=30, num_heads=4, num_kv_heads=1, head_dim=64,
                    dtype=jnp.float16)
  lengths = jnp.array([30, 9], jnp.int32)
  fn = functools.partial(_mosaic, config=SMALL)
  mapped = jax.jit(jax.vmap(lambda q, k, v, n: fn(q[None], k[None], v[None], lengths=n[None])[0]))
  out = mapped(q, k, v, lengths)
  testing.assert_close(out, testing.float64_reference(REFERENCE, q, k, v, lengths=lengths),
                       q.dtype, reduction_len=30)


def _reference_vjp(q, k, v, do, **kwargs):
  _, pullback = jax.vjp(lambda q, k, v: reference.attention(q, k, v, **kwargs), q, k, v)
  return pullback(do)


@pytest.mark.parametrize("interpret", MODES)
def test_grad_through_the_public_op(interpret):
  # jax.vjp through the public op: the Mosaic forward's (o, lse) feed the Mosaic backward.
  q, k, v, do = _inputs(4, batch=1, q_len=100, kv_len=150, num_heads=4, num_kv_heads=2,
                        head_dim=64, dtype=jnp.bfloat16, cot=True)
  kwargs = dict(lengths=jnp.array([140], jnp.int32))
  out, pullback = jax.vjp(functools.partial(_mosaic, interpret=interpret, **kwargs), q, k, v)
  grads = pullback(do)
  refs = testing.float64_reference(jax.jit(_reference_vjp), q, k, v, do, **kwargs)
  testing.assert_close(out, testing.float64_reference(REFERENCE, q, k, v, **kwargs), q.dtype)
  for name, grad, ref, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v)):
    assert grad.shape == x.shape and grad.dtype == x.dtype, name
    testing.assert_close(grad, ref, x.dtype, reduction_len=max(k.shape[1], 2 * q.shape[1]),
                         what=name)


def _writes_nothing(x_ref, o_ref):
  del x_ref, o_ref


def test_interpreter_poisons_unwritten_output():
  # The premise of the comparisons above for this interpreter: what a kernel does not write
  # reads as NaN, and NaN never passes.
  out = plgpu.kernel(_writes_nothing, out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
                     interpret=plgpu.InterpretGPUParams())(jnp.ones((128,), jnp.float32))
  assert np.all(np.isnan(np.asarray(out)))


# ---- refusals, configs, dispatch.

@pytest.mark.parametrize("dtype,head_dim,config,match", [
    (jnp.float32, 64, None, r"impl='mosaic' supports bfloat16/float16, got float32"),
    (jnp.bfloat16, 96, None, r"impl='mosaic' supports head_dim in \(64, 128\), got 96"),
    (jnp.bfloat16, 256, None, r"supports head_dim in \(64, 128\), got 256"),
    (jnp.bfloat16, 64, api.AttentionConfig(64, 64, 4, 2),
     r"impl='mosaic' takes config=MosaicAttentionConfig or None, got AttentionConfig"),
])
def test_refusals_say_why(dtype, head_dim, config, match):
  q = jnp.zeros((1, 8, 2, head_dim), dtype)
  with pytest.raises(ValueError, match=match):
    attention(q, q, q, impl="mosaic", interpret=True, config=config)


def test_register_p_is_refused_in_interpret_mode():
  q = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
  cfg = mosaic.MosaicAttentionConfig(p_in_registers=True)
  with pytest.raises(ValueError, match="p_in_registers=True\\) is GPU-only"):
    attention(q, q, q, impl="mosaic", interpret=True, config=cfg)


def test_config_type_picks_or_refuses_the_impl():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  pick = functools.partial(dispatch.select, "attention")
  cfg = mosaic.MosaicAttentionConfig()
  # impl=None with a Mosaic config: Triton refuses it, so the Mosaic kernel is chosen.
  assert pick(None, True, api.IMPLEMENTATIONS, q, q, q, config=cfg).name == "mosaic"
  with pytest.raises(ValueError, match="impl='triton' takes an AttentionConfig, "
                                       "got config=MosaicAttentionConfig"):
    attention(q, q, q, impl="triton", interpret=True, config=cfg)
  with pytest.raises(TypeError, match="`config` expected AttentionConfig or "
                                      "MosaicAttentionConfig or None, got dict"):
    attention(q, q, q, interpret=True, config={"block_kv": 128})


def test_config_validation():
  with pytest.raises(ValueError, match="`block_kv` expected a multiple of 64"):
    mosaic.MosaicAttentionConfig(block_kv=96)
  with pytest.raises(ValueError, match="`num_stages` expected an int >= 2"):
    mosaic.MosaicAttentionConfig(num_stages=1)


def _abstract_mesh(kind, num_cores=132):
  return testing.abstract_gpu(kind, num_cores)


def test_dispatch_default_stays_triton_and_mosaic_needs_hopper():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  pick = functools.partial(dispatch.select, "attention")
  assert [c.name for c in api.IMPLEMENTATIONS] == ["triton", "mosaic", "xla"]
  assert pick(None, True, api.IMPLEMENTATIONS, q, q, q).name == "triton"
  assert pick("mosaic", True, api.IMPLEMENTATIONS, q, q, q).name == "mosaic"
  with _abstract_mesh("NVIDIA A100-SXM4-80GB", 108):
    with pytest.raises(ValueError, match="impl='mosaic' needs a Hopper GPU"):
      pick("mosaic", False, api.IMPLEMENTATIONS, q, q, q)
  with _abstract_mesh(H100):
    assert pick("mosaic", False, api.IMPLEMENTATIONS, q, q, q).name == "mosaic"
    assert pick(None, False, api.IMPLEMENTATIONS, q, q, q).name == "triton"


# ---- offline CUDA lowering (GPU-OFFLINE.md section 2): Pallas lowers the kernel all the way to
# an NVVM-dialect module inside a `mosaic_gpu_v2` custom call, checking layouts, wgmma shapes and
# the shared-memory budget on the way. PTX and registers need the CUDA plugin (a GPU machine).

def _lower_for_h100(head_dim, config, *, num_heads=8, num_kv_heads=2, **kwargs):
  q = jax.ShapeDtypeStruct((1, 1024, num_heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1000, num_kv_heads, head_dim), jnp.bfloat16)
  fn = functools.partial(attention, impl="mosaic", config=config, **kwargs)
  with _abstract_mesh(H100):
    return jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()


def test_lowers_for_h100_causal_d128():
  text = _lower_for_h100(128, None, causal=True, logit_softcap=30.0)
  assert "stablehlo.custom_call @mosaic_gpu_v2" in text
  assert "__gpu$xla.gpu.triton" not in text  # the forward alone: no backward was traced


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("p_in_registers", [False, True])
def test_lowers_for_h100_every_variant(head_dim, p_in_registers):
  cfg = dataclasses.replace(mosaic.heuristic(head_dim), p_in_registers=p_in_registers)
  text = _lower_for_h100(head_dim, cfg, causal=True, sliding_window=256,
                         lengths=jnp.full((1,), 900, jnp.int32))
  assert "stablehlo.custom_call @mosaic_gpu_v2" in text


@pytest.mark.slow
def test_shared_memory_estimate_matches_the_lowering():
  # The lowering refuses a kernel over 227 KB and reports its exact size: our estimate (used
  # in the notes) is within 1 KB of it, and the default configs fit.
  for cfg in (mosaic.MosaicAttentionConfig(128, 3), mosaic.MosaicAttentionConfig(256, 2)):
    with pytest.raises(ValueError, match=r"exceeds available shared memory") as err:
      _lower_for_h100(128, cfg)
    actual = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    assert abs(actual - mosaic.shared_memory_bytes(cfg, 128, jnp.bfloat16)) <= 1024, actual
  for head_dim in (64, 128):
    assert mosaic.shared_memory_bytes(mosaic.heuristic(head_dim), head_dim,
                                      jnp.bfloat16) <= 227 * 1024


@pytest.mark.slow
def test_no_races_detected():
  # The interpreter's race detector on a causal tile with a wrapping ring (4 kv tiles, 2 slots).
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # private: no public API
  q, k, v = _inputs(5, batch=1, q_len=128, kv_len=256, num_heads=1, num_kv_heads=1,
                    head_dim=64, dtype=jnp.bfloat16)
  rows = jnp.array([256], jnp.int32), jnp.array([128], jnp.int32)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    out, _ = mosaic.forward(q, k, v, *rows, causal=True, window=None, softcap=None, scale=0.125,
                            cfg=SMALL, interpret=False)
    out.block_until_ready()
  assert not interpret_pallas_call.get_races().races_found
  testing.assert_close(out, testing.float64_reference(REFERENCE, q, k, v, scale=0.125),
                       q.dtype)


@pytest.mark.slow
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sweep_gqa_and_head_dims_default_config(group, head_dim):
  q, k, v = _inputs(group * head_dim, batch=1, q_len=200, kv_len=300, num_heads=2 * group,
                    num_kv_heads=2, head_dim=head_dim, dtype=jnp.bfloat16)
  kwargs = dict(lengths=jnp.array([290], jnp.int32))
  out = _mosaic(q, k, v, config=None, **kwargs)
  testing.assert_close(out, testing.float64_reference(REFERENCE, q, k, v, **kwargs), q.dtype)
