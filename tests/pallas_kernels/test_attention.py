"""Attention: every impl against a float64 reference, block edges, masks, GQA, errors, configs.

Shapes are small (interpret mode on a shared CPU); blocks are forced small with an explicit
config so every test crosses several q and kv tiles and ragged tile edges.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import testing
from pallas_kernels.ops.attention import AttentionConfig, attention, reference, specs
from pallas_kernels.ops.attention import config as config_lib
from pallas_kernels.ops.attention import triton as triton_impl

SMALL = AttentionConfig(block_q=32, block_k=16, num_warps=4, num_stages=2)
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
_STATIC = ("causal", "sliding_window", "logit_softcap", "scale")
# Jitted oracles: one XLA compile per shape instead of one per eager op.
REFERENCE = jax.jit(reference.attention, static_argnames=_STATIC)
REFERENCE_WITH_LSE = jax.jit(reference.attention_with_lse, static_argnames=_STATIC)


def _inputs(seed, *, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype):
  kq, kk, kv = testing.keys(seed, 3)
  return (testing.random_normal(kq, (batch, q_len, num_heads, head_dim), dtype),
          testing.random_normal(kk, (batch, kv_len, num_kv_heads, head_dim), dtype),
          testing.random_normal(kv, (batch, kv_len, num_kv_heads, head_dim), dtype))


def _run(mode, q, k, v, config=SMALL, **kwargs):
  impl, interpret = mode
  return attention(q, k, v, impl=impl, interpret=interpret, config=config, **kwargs)


def _check(mode, q, k, v, config=SMALL, **kwargs):
  out = _run(mode, q, k, v, config=config, **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  ref = testing.float64_reference(REFERENCE, q, k, v, **kwargs)
  testing.assert_close(out, ref, q.dtype, reduction_len=k.shape[1])
  return out, ref


# Together these cover GQA ratios 1, 2, 3, 4, 8, every head_dim, every dtype, causal and not,
# window, softcap, q_len 1, kv_len below one block, and lengths that are not block multiples.
MATCH_CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, kwargs)
    pytest.param(2, 40, 40, 2, 2, 64, "fp32", {}, id="mha-d64-fp32-causal"),
    pytest.param(1, 24, 45, 4, 2, 80, "bf16", {"causal": False}, id="g2-d80-bf16-full"),
    pytest.param(1, 33, 33, 3, 1, 96, "fp16", {"sliding_window": 7}, id="g3-d96-fp16-window"),
    pytest.param(2, 1, 12, 8, 2, 128, "bf16", {"logit_softcap": 5.0, "scale": 0.3},
                 id="g4-d128-bf16-q1-kvsmall-softcap"),
    pytest.param(1, 19, 37, 8, 1, 256, "bf16", {}, id="mqa8-d256-bf16-chunk"),
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,kwargs", MATCH_CASES)
def test_matches_reference(impl_mode, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype,
                           kwargs):
  q, k, v = _inputs(1, batch=batch, q_len=q_len, kv_len=kv_len, num_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPES[dtype])
  _check(impl_mode, q, k, v, **kwargs)


def test_ragged_lengths_and_empty_rows_are_zero(impl_mode):
  # Row 0 has no keys at all; row 1's length is not a block multiple; with a window, the early
  # queries of row 2 (q_offset 0) see keys but the later ones see only their window.
  q, k, v = _inputs(2, batch=3, q_len=20, kv_len=40, num_heads=4, num_kv_heads=2, head_dim=64,
                    dtype=jnp.bfloat16)
  lengths = jnp.array([0, 13, 40], jnp.int32)
  q_offset = jnp.array([20, 5, 0], jnp.int32)
  out, _ = _check(impl_mode, q, k, v, lengths=lengths, q_offset=q_offset, sliding_window=11)
  assert np.all(np.asarray(out[0], np.float32) == 0.0)


def test_chunked_prefill_equals_rows_of_full_attention(impl_mode):
  # A 48-slot cache holding 37 tokens; the chunk is queries 16..31 of a 37-token prefill.
  full_len, kv_len, lo, hi = 37, 48, 16, 32
  q, k, v = _inputs(3, batch=2, q_len=full_len, kv_len=kv_len, num_heads=6, num_kv_heads=2,
                    head_dim=64, dtype=jnp.float32)
  lengths = jnp.full((2,), full_len, jnp.int32)
  full = testing.float64_reference(REFERENCE, q[:, :full_len], k[:, :full_len],
                                   v[:, :full_len])
  chunk = _run(impl_mode, q[:, lo:hi], k, v, lengths=lengths,
               q_offset=jnp.full((2,), lo, jnp.int32))
  testing.assert_close(chunk, full[:, lo:hi], jnp.float32, reduction_len=full_len)


def test_jit_of_vmap(impl_mode):
  impl, interpret = impl_mode
  q, k, v = _inputs(4, batch=2, q_len=17, kv_len=30, num_heads=4, num_kv_heads=1, head_dim=64,
                    dtype=jnp.float16)
  lengths = jnp.array([30, 9], jnp.int32)
  # vmap over the batch axis: each example is a batch of one.
  fn = functools.partial(attention, impl=impl, interpret=interpret, config=SMALL)
  mapped = jax.jit(jax.vmap(lambda q, k, v, n: fn(q[None], k[None], v[None], lengths=n[None])[0]))
  out = mapped(q, k, v, lengths)
  ref = testing.float64_reference(REFERENCE, q, k, v, lengths=lengths)
  testing.assert_close(out, ref, jnp.float16, reduction_len=30)


@given(data=st.data())
@settings(max_examples=3, deadline=None)
def test_property_random_shapes(data):
  # Triton path only (interpret): the XLA path is the reference itself.
  draw = data.draw
  kv_heads = draw(st.sampled_from([1, 2]))
  group = draw(st.sampled_from([1, 2, 3, 4]))
  q_len = draw(st.integers(1, 40))
  kv_len = draw(st.integers(1, 48))
  causal = draw(st.booleans())
  window = draw(st.one_of(st.none(), st.integers(1, 24))) if causal else None
  lengths = jnp.array([draw(st.integers(0, kv_len)), kv_len], jnp.int32)
  q, k, v = _inputs(draw(st.integers(0, 2**16)), batch=2, q_len=q_len, kv_len=kv_len,
                    num_heads=group * kv_heads, num_kv_heads=kv_heads, head_dim=64,
                    dtype=jnp.float32)
  _check(("triton", True), q, k, v, causal=causal, sliding_window=window, lengths=lengths)


# ---- kernel internals: lse for the backward pass, and proof that masked-out tiles are skipped.

@functools.cache
def _kernel_with_internals(interpret):
  # Causal + window 40 over 96 keys with 16-key tiles: each q tile needs a few tiles only.
  q, k, v = _inputs(5, batch=2, q_len=70, kv_len=96, num_heads=6, num_kv_heads=3, head_dim=64,
                    dtype=jnp.bfloat16)
  lengths = jnp.array([96, 71], jnp.int32)
  kwargs = dict(causal=True, sliding_window=40, lengths=lengths)
  out, lse, counts = triton_impl.attention(q, k, v, config=SMALL, interpret=interpret,
                                           return_lse=True, count_tiles=True, **kwargs)
  return (q, k, v, kwargs), out, lse, counts


def _expected_tile_counts(*, batch_lengths, q_len, kv_len, group, causal, window):
  """Brute force over the tile grid: (masked, unmasked) tiles each q tile needs."""
  positions, _, block_k = triton_impl.tile_shape(SMALL, q_len=q_len, kv_len=kv_len, group=group)
  q_offset = kv_len - q_len
  masked, unmasked = [], []
  for length in batch_lengths:
    row_m, row_u = [], []
    for start in range(0, q_len, positions):
      pos = q_offset + np.arange(start, min(start + positions, q_len))[:, None]
      n_m = n_u = 0
      for k0 in range(0, kv_len, block_k):
        key = np.arange(k0, k0 + block_k)[None, :]
        vis = (key < length) & ((key <= pos) if causal else True)
        if window is not None:
          vis &= key > pos - window
        n_u += bool(vis.all())
        n_m += bool(vis.any() and not vis.all())
      row_m.append(n_m)
      row_u.append(n_u)
    masked.append(row_m)
    unmasked.append(row_u)
  return np.array(masked), np.array(unmasked)


def test_kernel_lse_matches_reference(kernel_mode):
  (q, k, v, kwargs), out, lse, _ = _kernel_with_internals(kernel_mode[1])
  ref_out, ref_lse = testing.float64_reference(REFERENCE_WITH_LSE, q, k, v, **kwargs)
  testing.assert_close(out, ref_out, q.dtype, reduction_len=k.shape[1])
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-2, atol=2e-2)


def test_kernel_skips_fully_masked_tiles(kernel_mode):
  (q, k, _, kwargs), _, _, (masked, unmasked) = _kernel_with_internals(kernel_mode[1])
  exp_masked, exp_unmasked = _expected_tile_counts(
      batch_lengths=[96, 71], q_len=q.shape[1], kv_len=k.shape[1], group=2, causal=True,
      window=kwargs["sliding_window"])
  masked, unmasked = np.asarray(masked), np.asarray(unmasked)  # [batch, kv_heads, q_tiles]
  for h in range(k.shape[2]):
    np.testing.assert_array_equal(masked[:, h], exp_masked)
    np.testing.assert_array_equal(unmasked[:, h], exp_unmasked)
  total_tiles = -(-k.shape[1] // 16)
  assert (masked + unmasked).max() < total_tiles  # something was skipped
  assert unmasked.sum() > 0  # and interior tiles ran without a mask


# ---- argument errors.

def _ok(**overrides):
  q, k, v = (jnp.zeros((2, 8, 4, 64), jnp.bfloat16), jnp.zeros((2, 8, 2, 64), jnp.bfloat16),
             jnp.zeros((2, 8, 2, 64), jnp.bfloat16))
  args = dict(q=q, k=k, v=v)
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(q=jnp.zeros((8, 4, 64), jnp.bfloat16)), ValueError, r"`q` expected rank 4"),
    (dict(k=jnp.zeros((2, 8, 2, 32), jnp.bfloat16)), ValueError, r"`k` expected head_dim of q"),
    (dict(k=jnp.zeros((3, 8, 2, 64), jnp.bfloat16)), ValueError, r"`k` expected batch of q"),
    (dict(v=jnp.zeros((2, 9, 2, 64), jnp.bfloat16)), ValueError,
     r"`v` expected shape .*shape of k"),
    (dict(k=jnp.zeros((2, 8, 3, 64), jnp.bfloat16), v=jnp.zeros((2, 8, 3, 64), jnp.bfloat16)),
     ValueError, r"`k` expected num_kv_heads dividing num_heads = 4"),
    (dict(v=jnp.zeros((2, 8, 2, 64), jnp.float32)), TypeError, r"expected one dtype.*v=float32"),
    (dict(q=jnp.zeros((2, 8, 4, 64), jnp.int32)), TypeError, r"`q` expected dtype in"),
    (dict(lengths=jnp.zeros((2,), jnp.int16)),
     TypeError, r"`lengths` expected dtype int32"),
    (dict(lengths=jnp.zeros((3,), jnp.int32)), ValueError, r"`lengths` expected shape \(2,\)"),
    (dict(q_offset=[1, 2]), TypeError, r"`q_offset` expected an int32 array"),
    (dict(q_offset=jnp.zeros((2, 1), jnp.int32)), ValueError, r"`q_offset` expected shape"),
    (dict(sliding_window=0), ValueError, r"`sliding_window` expected a positive int"),
    (dict(sliding_window=4, causal=False), ValueError, r"`sliding_window` expected causal=True"),
    (dict(logit_softcap=-1.0), ValueError, r"`logit_softcap` expected a positive float"),
    (dict(scale=0.0), ValueError, r"`scale` expected a positive float"),
    (dict(causal=1), TypeError, r"`causal` expected a bool"),
    (dict(config={"block_q": 64}), TypeError, r"`config` expected AttentionConfig"),
])
def test_bad_arguments(overrides, error, match):
  args = _ok(**overrides)
  with pytest.raises(error, match=match):
    attention(args.pop("q"), args.pop("k"), args.pop("v"), impl="triton", interpret=True,
              **args)


def test_config_validation_and_triton_refusal():
  with pytest.raises(ValueError, match="`block_q` expected a power of two"):
    AttentionConfig(block_q=96, block_k=64, num_warps=4, num_stages=2)
  with pytest.raises(ValueError, match="`num_warps` expected one of"):
    AttentionConfig(block_q=64, block_k=64, num_warps=3, num_stages=2)
  q = jnp.zeros((1, 4, 1, 512), jnp.bfloat16)
  with pytest.raises(ValueError, match="head_dim <= 256"):
    attention(q, q, q, impl="triton", interpret=True)


# ---- configs: heuristic per target, shared memory, tuning key, tuned table.

@pytest.mark.parametrize("kind", testing.GPU_KINDS)
def test_heuristic_fits_shared_memory(kind):
  with testing.abstract_gpu(kind) as target:
    # fp32 accumulator registers per thread: <= 64 keeps head_dim 256 from spilling.
    testing.assert_heuristic_fits(config_lib, target, max_registers=64)
    for head_dim in (64, 80, 96, 128, 256):
      q = jax.ShapeDtypeStruct((1, 512, 8, head_dim), jnp.bfloat16)
      tries = config_lib.candidates(target, q, q, q)
      assert tries[0] == config_lib.heuristic(target, head_dim=head_dim, dtype=jnp.bfloat16)
      assert len(set(tries)) == len(tries) > 10
      assert all(config_lib.shared_memory_bytes(c, head_dim, jnp.bfloat16)
                 <= target.max_shared_memory_bytes for c in tries)
  with testing.abstract_gpu(testing.GPU_KINDS[0]):
    ampere = config_lib.resolve(None, head_dim=256, dtype=jnp.bfloat16, causal=True,
                                q_len=4096, kv_len=4096)
  with testing.abstract_gpu(testing.GPU_KINDS[1]):
    hopper = config_lib.resolve(None, head_dim=256, dtype=jnp.bfloat16, causal=True,
                                q_len=4096, kv_len=4096)
  assert ampere != hopper  # the target decides


def test_tuning_key_and_tuned_table(tmp_path, monkeypatch):
  key = config_lib.tuning_key(head_dim=128, dtype=jnp.bfloat16, causal=True, q_len=3000,
                              kv_len=5)
  assert key == {"head_dim": 128, "dtype": "bfloat16", "causal": True, "q_len": 4096,
                 "kv_len": 16}
  monkeypatch.setattr(config_lib, "OP_DIR", tmp_path)
  tuned = AttentionConfig(block_q=64, block_k=128, num_warps=4, num_stages=4)
  from pallas_kernels._core import config as core_config
  core_config.write_table(tmp_path, "attention", testing.GPU_KINDS[1], jax.__version__,
                          [{"key": key, "config": core_config.as_dict(tuned)}])
  with testing.abstract_gpu(testing.GPU_KINDS[1]):
    assert config_lib.resolve(None, head_dim=128, dtype=jnp.bfloat16, causal=True, q_len=2049,
                              kv_len=16) == tuned
    assert config_lib.resolve(None, head_dim=128, dtype=jnp.bfloat16, causal=False,
                              q_len=2049, kv_len=16) != tuned


def test_specs_catalogue():
  labels = [c.label for c in specs.CASES]
  assert len(set(labels)) == len(labels)
  assert {64, 128, 256} <= {c.abstract_inputs()[0].shape[-1] for c in specs.CASES if c.audit}
  for case in specs.CASES:
    q, k, _ = case.abstract_inputs()
    # Useful FLOPs: never more than the dense count, and exactly it for causal q_len == 1.
    assert 0 < case.flops <= 4 * q.shape[0] * q.shape[2] * q.shape[3] * q.shape[1] * k.shape[1]
  assert specs.visible_pairs(4, 4) == 10
  assert specs.visible_pairs(4, 4, sliding_window=2) == 7
  assert specs.visible_pairs(2, 6, causal=False) == 12
  assert {"xla", "cudnn", "jax-pallas"} <= set(specs.peers())


# ---- slow: the CUDA lowering of the audit cases, and a wider sweep.

@pytest.mark.slow
@pytest.mark.parametrize("kind", testing.GPU_KINDS)
def test_audit_cases_lower_for_cuda(kind):
  for case in (c for c in specs.CASES if c.audit):
    args = case.abstract_inputs()
    fn = functools.partial(attention, impl="triton", **case.kwargs)
    with testing.abstract_gpu(kind):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text, case.label


@pytest.mark.slow
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_sweep_gqa_and_head_dims(group, head_dim):
  q, k, v = _inputs(group * head_dim, batch=1, q_len=50, kv_len=67, num_heads=2 * group,
                    num_kv_heads=2, head_dim=head_dim, dtype=jnp.bfloat16)
  _check(("triton", True), q, k, v, lengths=jnp.array([60], jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_default_config_larger_shapes(dtype):
  q, k, v = _inputs(7, batch=1, q_len=300, kv_len=300, num_heads=4, num_kv_heads=2,
                    head_dim=128, dtype=DTYPES[dtype])
  _check(("triton", True), q, k, v, config=None, sliding_window=100, logit_softcap=20.0)
