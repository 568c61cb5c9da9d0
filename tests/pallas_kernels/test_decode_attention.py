"""Decode attention (flash-decoding) against a float64 evaluation of the plain-JAX reference.

Every kernel test runs through `impl_mode` (xla, Triton in interpret mode, Triton on a GPU) on
fresh random inputs. Shapes are tiny so that interpret-mode compiles stay short: `block_k` 16 and
max_len 48-80 give several key blocks, ragged last blocks and (with several splits) empty splits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import testing
from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device
from pallas_kernels.ops.decode_attention import DecodeAttentionConfig, decode_attention
from pallas_kernels.ops.decode_attention import config as cfg
from pallas_kernels.ops.decode_attention import reference, specs
from pallas_kernels.ops.decode_attention import triton as triton_impl

# block_k 16 over max_len 64 is 4 blocks; 3 splits leave some splits empty for short rows.
SMALL = DecodeAttentionConfig(block_k=16, num_splits=3, num_warps=4, num_stages=2)
_oracle = jax.jit(reference.decode_attention,
                  static_argnames=("scale", "sliding_window", "logit_softcap"))


def _normal(rng, shape, dtype):
  """Fresh standard-normal data rounded to `dtype`. numpy, not jax.random: on CPU every new shape
  costs a 2-5 s threefry compile, more than the kernel under test."""
  return jnp.asarray(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)))


def _inputs(seed, batch, num_heads, num_kv_heads, head_dim, max_len, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  cache = (batch, max_len, num_kv_heads, head_dim)
  return (_normal(rng, (batch, num_heads, head_dim), dtype), _normal(rng, cache, dtype),
          _normal(rng, cache, dtype))


def _run(mode, q, k, v, lengths, config=SMALL, **kwargs):
  impl, interpret = mode
  return decode_attention(q, k, v, lengths, impl=impl, interpret=interpret,
                          config=config if impl == "triton" else None, **kwargs)


def _check(mode, q, k, v, lengths, config=SMALL, **kwargs):
  out = _run(mode, q, k, v, lengths, config, **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  ref = testing.float64_reference(_oracle, q, k, v, lengths, **kwargs)
  testing.assert_close(out, ref, q.dtype, reduction_len=k.shape[1])
  return out


def test_ragged_lengths_one_and_zero(impl_mode):
  """Lengths off block edges, a length-1 row, a full row and an empty row (zeros) in one batch."""
  q, k, v = _inputs(0, 5, 8, 2, 64, 64)
  lengths = jnp.array([37, 1, 64, 0, 17], jnp.int32)
  out = np.asarray(_check(impl_mode, q, k, v, lengths), np.float32)
  np.testing.assert_array_equal(out[3], 0)
  # A length-1 row attends to key 0 alone: its output is v[0] of its KV head, exactly.
  np.testing.assert_array_equal(out[1], np.repeat(np.asarray(v, np.float32)[1, 0], 4, axis=0))


@pytest.mark.parametrize("num_heads,num_kv_heads", [
    (4, 4), pytest.param(4, 2, marks=pytest.mark.slow), (9, 3), (8, 1)],
                         ids=["mha", "gqa2", "gqa3", "mqa8"])
def test_group_sizes(impl_mode, num_heads, num_kv_heads):
  """GQA 4 is covered by the other tests."""
  q, k, v = _inputs(1, 2, num_heads, num_kv_heads, 64, 48)
  _check(impl_mode, q, k, v, jnp.array([48, 29], jnp.int32))


@pytest.mark.parametrize("head_dim", [80, pytest.param(96, marks=pytest.mark.slow),
                                      pytest.param(128, marks=pytest.mark.slow), 256])
def test_head_dims(impl_mode, head_dim):
  """80 and 96 are padded to 128 inside the kernel (masked columns)."""
  q, k, v = _inputs(2, 2, 4, 2, head_dim, 48)
  _check(impl_mode, q, k, v, jnp.array([33, 48], jnp.int32))


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow, id="fp32"),
                                   pytest.param(jnp.float16, id="fp16")])
def test_dtypes(impl_mode, dtype):
  """bf16 is the default everywhere else; fp32 also runs in the causal-prefill tests."""
  q, k, v = _inputs(3, 2, 4, 2, 64, 48, dtype)
  _check(impl_mode, q, k, v, jnp.array([40, 7], jnp.int32))


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(sliding_window=13), marks=pytest.mark.slow, id="window"),
    pytest.param(dict(logit_softcap=1.5, scale=0.3, sliding_window=40), id="softcap-scale-window"),
])
def test_window_and_softcap(impl_mode, kwargs):
  """Window start off block edges; windows shorter and longer than the lengths. (The window
  alone is also covered by the poison and the causal-prefill tests.)"""
  q, k, v = _inputs(4, 4, 8, 2, 64, 64)
  _check(impl_mode, q, k, v, jnp.array([64, 30, 5, 0], jnp.int32), **kwargs)


@pytest.mark.parametrize("num_splits", [pytest.param(1, marks=pytest.mark.slow),
                                        pytest.param(2, marks=pytest.mark.slow), 7])
def test_num_splits(kernel_mode, num_splits):
  """7 splits over 4 blocks (clamped to 4), and rows of 0-2 blocks: empty splits contribute 0.
  (One split also runs in the jit/vmap test, whose heuristic config has one.)"""
  q, k, v = _inputs(5, 4, 4, 2, 64, 64)
  config = DecodeAttentionConfig(block_k=16, num_splits=num_splits, num_warps=4, num_stages=2)
  _check(kernel_mode, q, k, v, jnp.array([64, 20, 3, 0], jnp.int32), config)


def _causal_last_rows(q_all, k, v, lengths, sliding_window=None):
  """Own float64 causal prefill over each prefix; returns the row of position lengths - 1."""
  q_all, k, v = (np.asarray(x, np.float64) for x in (q_all, k, v))
  batch, max_len, num_heads, head_dim = q_all.shape
  group = num_heads // k.shape[2]
  out = np.zeros((batch, num_heads, head_dim))
  for b, length in enumerate(np.asarray(lengths)):
    kk = np.repeat(k[b, :length], group, axis=1)                   # [L, H, D]
    vv = np.repeat(v[b, :length], group, axis=1)
    s = np.einsum("ihd,jhd->hij", q_all[b, :length], kk) / np.sqrt(head_dim)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    visible = (j <= i) if sliding_window is None else (j <= i) & (j > i - sliding_window)
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    rows = np.einsum("hij,jhd->ihd", p / p.sum(-1, keepdims=True), vv)  # [L, H, D]
    out[b] = rows[length - 1]
  return out


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_equals_last_row_of_causal_prefill(impl_mode, sliding_window):
  batch, max_len, num_heads, num_kv_heads, head_dim = 3, 48, 6, 2, 64
  rng = np.random.default_rng(6)
  q_all = rng.standard_normal((batch, max_len, num_heads, head_dim), np.float32)
  k = _normal(rng, (batch, max_len, num_kv_heads, head_dim), jnp.float32)
  v = _normal(rng, (batch, max_len, num_kv_heads, head_dim), jnp.float32)
  lengths = np.array([48, 21, 1], np.int32)
  q = jnp.asarray(q_all[np.arange(batch), lengths - 1])  # the newest token of each sequence
  out = _run(impl_mode, q, k, v, jnp.asarray(lengths), sliding_window=sliding_window)
  testing.assert_close(out, _causal_last_rows(q_all, k, v, lengths, sliding_window), jnp.float32)


def test_poisoned_slots_do_not_leak(impl_mode):
  """NaN / 1e30 in every slot outside [lengths - window, lengths): never read, never leaks."""
  q, k, v = _inputs(7, 3, 4, 2, 64, 64)
  lengths, window = np.array([50, 9, 0], np.int32), 20
  pos = np.arange(64)[None, :, None, None]
  hi = lengths[:, None, None, None]
  outside = (pos < hi - window) | (pos >= hi)
  poison = np.where(np.arange(64)[None, :, None, None] % 2 == 0, np.nan, 1e30)
  k_bad = jnp.asarray(np.where(outside, np.nan, np.asarray(k, np.float32)).astype(k.dtype))
  v_bad = jnp.asarray(np.where(outside, poison, np.asarray(v, np.float32)).astype(v.dtype))
  out = _run(impl_mode, q, k_bad, v_bad, jnp.asarray(lengths), sliding_window=window)
  ref = testing.float64_reference(_oracle, q, k, v, jnp.asarray(lengths), sliding_window=window)
  testing.assert_close(out, ref, q.dtype)


def _numpy_decode(q, k, v, lengths, sliding_window=None):
  """Own float64 decode attention over each row's visible rows only (never touches the rest)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  out = np.zeros((batch, num_heads, head_dim))
  for b, length in enumerate(np.clip(np.asarray(lengths), 0, k.shape[1])):
    lo = 0 if sliding_window is None else max(length - sliding_window, 0)
    if length == 0:
      continue
    kk = np.repeat(k[b, lo:length], group, axis=1)  # [rows, num_heads, head_dim]
    vv = np.repeat(v[b, lo:length], group, axis=1)
    s = np.einsum("hd,thd->ht", q[b], kk) / np.sqrt(head_dim)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[b] = np.einsum("ht,thd->hd", p / p.sum(-1, keepdims=True), vv)
  return out


@pytest.mark.parametrize("num_kv_heads", [2, reference._MAX_BLOCK_DIAGONAL_KV_HEADS + 1],
                         ids=["block-diagonal", "multiply-reduce"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["fp32", "fp64"])
def test_xla_paths_poisoned_against_numpy(num_kv_heads, dtype):
  """The "xla" reference has two contraction strategies (by num_kv_heads) and reads the raw
  caches (V is masked only when `p @ v` comes out non-finite). Each against an independent
  numpy evaluation, with NaN / inf / 1e30 outside the visible rows, an empty row, a clamped
  length; float64 inputs are computed in float64 (the oracle's contract)."""
  with jax.enable_x64(dtype == jnp.float64):
    q, k, v = _inputs(12, 4, 2 * num_kv_heads, num_kv_heads, 64, 40, dtype)
    lengths, window = np.array([33, 6, 0, 99], np.int32), 17
    pos = np.arange(40)[None, :, None, None]
    hi = np.minimum(lengths, 40)[:, None, None, None]
    outside = (pos < hi - window) | (pos >= hi)
    poison = np.select([pos % 3 == 0, pos % 3 == 1], [np.nan, np.inf], 1e30)
    k_bad = jnp.asarray(np.where(outside, poison, np.asarray(k)))
    v_bad = jnp.asarray(np.where(outside, -poison, np.asarray(v)))
    # The public op takes no float64: the oracle is the reference function itself.
    fn = (_oracle if dtype == jnp.float64 else functools.partial(decode_attention, impl="xla"))
    out = fn(q, k_bad, v_bad, jnp.asarray(lengths), sliding_window=window)
    assert out.dtype == dtype
    ref = _numpy_decode(q, k, v, lengths, sliding_window=window)
    out = np.asarray(out, np.float64)
    np.testing.assert_array_equal(out[2], 0)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 if dtype == jnp.float64 else 1e-5)


def test_jit_of_vmap_over_layers(impl_mode):
  """jit(vmap(...)) over a leading layer axis with lengths shared: each layer equals its own
  reference. The default (heuristic) config: block_k 128 > max_len 48, one partial block."""
  impl, interpret = impl_mode
  layers = [_inputs(seed, 2, 4, 2, 64, 48) for seed in (9, 10)]
  stacked = [jnp.asarray(np.stack([np.asarray(x) for x in xs])) for xs in zip(*layers)]
  lengths = jnp.array([20, 47], jnp.int32)
  fn = functools.partial(decode_attention, impl=impl, interpret=interpret)
  out = np.asarray(jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None)))(*stacked, lengths))
  for layer, (q, k, v) in enumerate(layers):
    testing.assert_close(out[layer], testing.float64_reference(_oracle, q, k, v, lengths),
                         q.dtype, what=f"layer {layer}")


@settings(deadline=None, max_examples=5, derandomize=True)
@given(lengths=st.lists(st.integers(0, 90), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_property_any_lengths_match_reference(lengths, seed):
  """For any lengths (beyond max_len = 80 they are clamped), the interpreted kernel matches the
  float64 reference. One compiled kernel: lengths and data are runtime values."""
  q, k, v = _inputs(seed, 3, 6, 2, 64, 80)
  config = DecodeAttentionConfig(block_k=16, num_splits=4, num_warps=4, num_stages=2)
  _check(("triton", True), q, k, v, jnp.array(lengths, jnp.int32), config)


def test_default_impl_on_cpu_is_xla_and_matches():
  q, k, v = _inputs(11, 2, 4, 2, 64, 48)
  lengths = jnp.array([48, 5], jnp.int32)
  out = decode_attention(q, k, v, lengths)
  testing.assert_close(out, testing.float64_reference(_oracle, q, k, v, lengths), q.dtype)


# ---- bad input --------------------------------------------------------------------------------

def _good():
  q = jnp.zeros((2, 8, 64), jnp.bfloat16)
  k = jnp.zeros((2, 32, 2, 64), jnp.bfloat16)
  return q, k, k, jnp.array([3, 4], jnp.int32)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, r"`q` expected rank 3 \[batch, num_heads"),
    (lambda a: {**a, "k_cache": a["k_cache"][0]}, ValueError, r"`k_cache` expected rank 4"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :16]}, ValueError,
     r"`v_cache` expected shape \(2, 32, 2, 64\) \(the shape of `k_cache`\), got \(2, 16, 2, 64\)"),
    (lambda a: {**a, "k_cache": a["k_cache"][..., :32], "v_cache": a["v_cache"][..., :32]},
     ValueError, r"`k_cache` expected head_dim = q.shape\[2\] = 64 at axis 3"),
    (lambda a: {**a, "k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]},
     ValueError, r"`k_cache` expected batch = q.shape\[0\] = 2 at axis 0"),
    (lambda a: {**a, "q": a["q"][:, :7]}, ValueError,
     r"`q` expected num_heads a multiple of num_kv_heads = 2 .*got num_heads = 7"),
    (lambda a: {**a, "lengths": a["lengths"].astype(jnp.float32)}, TypeError,
     r"`lengths` expected dtype int32, got float32"),
    (lambda a: {**a, "lengths": a["lengths"][:1]}, ValueError,
     r"`lengths` expected shape \(2,\) \[batch\], got \(1,\)"),
    (lambda a: {**a, "lengths": [3, 4]}, TypeError, r"`lengths` expected an int32 array"),
    (lambda a: {**a, "q": a["q"].astype(jnp.float32)}, TypeError,
     r"`q`, `k_cache`, `v_cache` expected one dtype, got q=float32"),
    (lambda a: {**a, "q": a["q"].astype(jnp.int32)}, TypeError, r"`q` expected dtype in"),
    (lambda a: {**a, "sliding_window": 0}, ValueError, r"`sliding_window` expected a positive int"),
    (lambda a: {**a, "sliding_window": 2.5}, ValueError,
     r"`sliding_window` expected a positive int"),
    (lambda a: {**a, "logit_softcap": -1.0}, ValueError, r"`logit_softcap` expected a positive"),
    (lambda a: {**a, "scale": 0.0}, ValueError, r"`scale` expected a positive float"),
    (lambda a: {**a, "config": {"block_k": 16}}, TypeError,
     r"`config` expected DecodeAttentionConfig or None, got dict"),
    (lambda a: {**a, "impl": "cuda"}, ValueError, r"`impl` expected one of"),
    (lambda a: {**a, "impl": "triton"}, ValueError, r"impl='triton' needs an NVIDIA GPU"),
    (lambda a: {**a, "q": a["q"][..., :8], "k_cache": a["k_cache"][..., :8],
                "v_cache": a["v_cache"][..., :8], "impl": "triton", "interpret": True},
     ValueError, r"head_dim 8 outside \[16, 256\] for the Triton kernel"),
], ids=lambda x: None)
def test_bad_input_errors_name_the_argument(change, error, match):
  q, k, v, lengths = _good()
  args = change(dict(q=q, k_cache=k, v_cache=v, lengths=lengths))
  if args.get("impl") == "triton" and jax.devices()[0].platform == "gpu":
    pytest.skip("a GPU is present: impl='triton' is valid")
  with pytest.raises(error, match=r"decode_attention: .*" + match):
    decode_attention(**args)


def test_bad_config_values():
  with pytest.raises(ValueError, match="`block_k` expected a power of two >= 16, got 24"):
    DecodeAttentionConfig(block_k=24, num_splits=1, num_warps=4, num_stages=2)
  with pytest.raises(ValueError, match="`num_splits` expected a positive int, got 0"):
    DecodeAttentionConfig(block_k=16, num_splits=0, num_warps=4, num_stages=2)


# ---- config: heuristic, tuning key, tuned table -----------------------------------------------

def _abstract_mesh(kind, num_cores):
  return testing.abstract_gpu(kind, num_cores)


def test_heuristic_splits_fill_the_gpu_for_small_batches():
  with _abstract_mesh("NVIDIA H100 80GB HBM3", 132):
    h100 = device.current_target()
  assert h100.num_sms == 132
  long_b1 = cfg.heuristic(h100, batch=1, num_kv_heads=8, max_len=131072, head_dim=128,
                          dtype=jnp.bfloat16)
  assert long_b1.block_k == 64 and long_b1.num_stages == 3
  assert 1 * 8 * long_b1.num_splits >= 2 * 132          # batch 1 fills two programs per SM
  mqa_shard = cfg.heuristic(h100, batch=1, num_kv_heads=1, max_len=131072, head_dim=128,
                            dtype=jnp.bfloat16)
  assert mqa_shard.num_splits == cfg.MAX_SPLITS        # 1 KV head: capped, 512 keys per split
  big_batch = cfg.heuristic(h100, batch=64, num_kv_heads=8, max_len=4096, head_dim=128,
                            dtype=jnp.bfloat16)
  assert big_batch.num_splits == 1                       # 512 programs already fill 132 SMs
  short = cfg.heuristic(h100, batch=1, num_kv_heads=8, max_len=1024, head_dim=128,
                        dtype=jnp.bfloat16)
  assert short.num_splits == 1024 // cfg.MIN_KEYS_PER_SPLIT  # no split under 256 keys
  assert cfg.block_k_for(256, jnp.bfloat16) == 32 and cfg.block_k_for(64, jnp.bfloat16) == 128


def test_config_resolution_uses_the_target_and_the_tuned_table(tmp_path, monkeypatch):
  q, k, _, _ = _good()
  with _abstract_mesh("NVIDIA A100-SXM4-80GB", 108):
    a100 = triton_impl.resolve_config(q, k, None)
  with _abstract_mesh("NVIDIA H100 80GB HBM3", 132):
    h100 = triton_impl.resolve_config(q, k, None)
  assert a100.num_stages == 2 and h100.num_stages == 3
  key = cfg.tuning_key(head_dim=64, dtype=jnp.bfloat16, group=4, num_kv_heads=2, max_len=32,
                       batch=2)
  assert key == {"head_dim": 64, "dtype": "bfloat16", "group": 4, "num_kv_heads": 2,
                 "max_len": 32, "batch": 2}
  tuned = DecodeAttentionConfig(block_k=32, num_splits=5, num_warps=8, num_stages=4)
  monkeypatch.setattr(cfg, "OP_DIR", tmp_path)
  config_lib.write_table(tmp_path, "decode_attention", "NVIDIA H100 80GB HBM3", jax.__version__,
                         [{"key": key, "config": config_lib.as_dict(tuned)}])
  with _abstract_mesh("NVIDIA H100 80GB HBM3", 132):
    assert triton_impl.resolve_config(q, k, None) == tuned
    assert triton_impl.resolve_config(q, k, SMALL) == SMALL


def test_autotune_candidates_start_at_the_heuristic():
  h100 = device.Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024, 132)
  case = next(c for c in specs.CASES if c.label.startswith("llama3-8b decode b1 ctx 128k"))
  q, k, v, lengths = case.abstract_inputs()
  found = cfg.candidates(h100, q, k, v, lengths)
  assert found[0] == cfg.heuristic(h100, batch=1, num_kv_heads=8, max_len=131072, head_dim=128,
                                   dtype=jnp.bfloat16)
  assert len(set(found)) == len(found) > 20
  assert {c.num_splits for c in found} == {16, 33, 66}


# ---- specs and offline CUDA lowering ----------------------------------------------------------

def test_specs_cases_are_consistent():
  labels = [c.label for c in specs.CASES]
  assert len(labels) == len(set(labels))
  assert any(c.audit for c in specs.CASES)
  for case in specs.CASES:
    q, k, v, lengths = case.abstract_inputs()
    assert q.shape[0] == k.shape[0] == lengths.shape[0] and k.shape == v.shape
    assert case.bytes_moved > 0 and case.flops > 0
  llama = next(c for c in specs.CASES if c.label.startswith("llama3-8b decode b1 ctx 128k"))
  assert llama.bytes_moved == pytest.approx(2 * 131072 * 8 * 128 * 2, rel=1e-3)
  assert set(specs.peers()) >= {"xla", "jax-pallas", "cudnn"}


def _lower_for_cuda(case, kind, num_cores):
  args = case.abstract_inputs()
  fn = functools.partial(decode_attention, impl="triton", **case.kwargs)
  with _abstract_mesh(kind, num_cores):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


_AUDIT = [c for c in specs.CASES if c.audit]
_GPUS = [("NVIDIA A100-SXM4-80GB", 108), ("NVIDIA H100 80GB HBM3", 132)]


def test_lowers_for_cuda_sm90():
  assert "__gpu$xla.gpu.triton" in _lower_for_cuda(_AUDIT[1], *_GPUS[1])


@pytest.mark.slow
@pytest.mark.parametrize("gpu", _GPUS, ids=["sm80", "sm90"])
@pytest.mark.parametrize("case", _AUDIT, ids=[c.label for c in _AUDIT])
def test_audit_cases_lower_for_cuda(case, gpu):
  assert "__gpu$xla.gpu.triton" in _lower_for_cuda(case, *gpu)
