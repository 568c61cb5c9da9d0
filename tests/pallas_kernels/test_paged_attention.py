"""Paged decode attention against a float64 evaluation of the plain-JAX reference.

Every kernel test runs through `impl_mode` (xla, Triton in interpret mode, Triton on a GPU) on
fresh random inputs, with block tables that are random permutations of the page pool (plus
spare pages nobody references). Shapes are tiny so that interpret-mode compiles stay short, and
most tests share one shape and config so that they share one compile: `block_k` 16 over pages
of 8, 16 or 32 rows gives blocks spanning two pages, one page and half a page.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import decode_attention, testing
from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device
from pallas_kernels.audit import targets
from pallas_kernels.ops.decode_attention import config as decode_cfg
from pallas_kernels.ops.paged_attention import PagedAttentionConfig, paged_attention
from pallas_kernels.ops.paged_attention import config as cfg
from pallas_kernels.ops.paged_attention import reference, specs
from pallas_kernels.ops.paged_attention import triton as triton_impl

# block_k 16 over 4 pages of 16 is 4 blocks; 3 splits leave some splits empty for short rows.
SMALL = PagedAttentionConfig(block_k=16, num_splits=3, num_warps=4, num_stages=2)
SPARE_PAGES = 3  # pages of the pool that no table references
_oracle = jax.jit(reference.paged_attention,
                  static_argnames=("scale", "sliding_window", "logit_softcap"))


def _normal(rng, shape, dtype):
  """numpy, not jax.random: on CPU every new shape costs a threefry compile."""
  return jnp.asarray(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)))


def _inputs(seed, batch, num_heads, num_kv_heads, head_dim, *, page_size=16, max_pages=4,
            dtype=jnp.bfloat16):
  """q, k_pages, v_pages and a block table giving each row max_pages distinct random pages."""
  rng = np.random.default_rng(seed)
  num_pages = batch * max_pages + SPARE_PAGES
  pool = (num_pages, page_size, num_kv_heads, head_dim)
  tables = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
  return (_normal(rng, (batch, num_heads, head_dim), dtype), _normal(rng, pool, dtype),
          _normal(rng, pool, dtype), jnp.asarray(tables, jnp.int32))


def _run(mode, q, k, v, tables, lengths, config=SMALL, **kwargs):
  impl, interpret = mode
  return paged_attention(q, k, v, tables, lengths, impl=impl, interpret=interpret,
                         config=config if impl == "triton" else None, **kwargs)


def _check(mode, q, k, v, tables, lengths, config=SMALL, **kwargs):
  out = _run(mode, q, k, v, tables, lengths, config, **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  ref = testing.float64_reference(_oracle, q, k, v, tables, lengths, **kwargs)
  testing.assert_close(out, ref, q.dtype, reduction_len=tables.shape[1] * k.shape[1])
  return out


@pytest.mark.parametrize("page_size,max_pages", [(16, 4), (32, 2)], ids=["page16", "page32"])
def test_ragged_lengths_one_and_zero(impl_mode, page_size, max_pages):
  """Lengths off page and block edges, length 1, a full table and an empty row (zeros)."""
  q, k, v, tables = _inputs(0, 5, 8, 2, 64, page_size=page_size, max_pages=max_pages)
  lengths = jnp.array([37, 1, 64, 0, 17], jnp.int32)
  out = np.asarray(_check(impl_mode, q, k, v, tables, lengths), np.float32)
  np.testing.assert_array_equal(out[3], 0)
  # A length-1 row attends to position 0 alone: its output is that page's first V row, exactly.
  first_v = np.asarray(v, np.float32)[int(tables[1, 0]), 0]  # [num_kv_heads, head_dim]
  np.testing.assert_array_equal(out[1], np.repeat(first_v, 4, axis=0))


@pytest.mark.parametrize("num_heads,num_kv_heads", [
    pytest.param(4, 4, marks=pytest.mark.slow), (9, 3), (16, 2),
    pytest.param(8, 1, marks=pytest.mark.slow)], ids=["mha", "gqa3", "gqa8", "mqa8"])
def test_group_sizes_with_pages_of_8(impl_mode, num_heads, num_kv_heads):
  """GQA ratios 3 and 8 (1 in the head_dim tests, 4 elsewhere); blocks of 16 positions span
  two pages of 8."""
  q, k, v, tables = _inputs(1, 2, num_heads, num_kv_heads, 64, page_size=8, max_pages=6)
  _check(impl_mode, q, k, v, tables, jnp.array([48, 29], jnp.int32))


@pytest.mark.parametrize("head_dim", [80, pytest.param(96, marks=pytest.mark.slow),
                                      pytest.param(128, marks=pytest.mark.slow), 256])
def test_head_dims(impl_mode, head_dim):
  """80 and 96 are padded to 128 inside the kernel (masked columns). MHA (GQA ratio 1)."""
  q, k, v, tables = _inputs(2, 2, 4, 4, head_dim, max_pages=3)
  _check(impl_mode, q, k, v, tables, jnp.array([33, 48], jnp.int32))


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow, id="fp32"),
                                   pytest.param(jnp.float16, id="fp16")])
def test_dtypes(impl_mode, dtype):
  q, k, v, tables = _inputs(3, 2, 4, 2, 64, max_pages=3, dtype=dtype)
  _check(impl_mode, q, k, v, tables, jnp.array([40, 7], jnp.int32))


def test_window_softcap_and_scale(impl_mode):
  """A window starting off page and block edges, shorter and longer than the lengths."""
  q, k, v, tables = _inputs(4, 5, 8, 2, 64)
  _check(impl_mode, q, k, v, tables, jnp.array([64, 30, 5, 0, 50], jnp.int32),
         logit_softcap=1.5, scale=0.3, sliding_window=21)


@pytest.mark.parametrize("num_splits", [pytest.param(1, marks=pytest.mark.slow), 7])
def test_num_splits(kernel_mode, num_splits):
  """7 splits over 4 blocks (clamped to 4), and rows of 0-2 blocks: empty splits add 0."""
  q, k, v, tables = _inputs(5, 5, 8, 2, 64)
  config = PagedAttentionConfig(block_k=16, num_splits=num_splits, num_warps=4, num_stages=2)
  _check(kernel_mode, q, k, v, tables, jnp.array([64, 20, 3, 0, 33], jnp.int32), config)


def test_garbage_outside_the_visible_pages_does_not_leak(impl_mode):
  """NaN / 1e30 in every pool row outside the visible positions (spare pages, the tails of
  last pages, the pages before a window); table slots past a row's length pointing at the
  scratch page 0, at another row's visible page, or out of range (-1, 10**6)."""
  q, k, v, tables = _inputs(6, 5, 8, 2, 64)
  lengths, window = np.array([50, 9, 0, 64, 17], np.int32), 20
  tables = np.asarray(tables)
  page_size = k.shape[1]
  visible_rows = np.zeros(k.shape[:2], bool)  # [num_pages, page_size]
  for row, length in enumerate(lengths):
    for pos in range(max(0, length - window), length):
      visible_rows[tables[row, pos // page_size], pos % page_size] = True
  used = -(-lengths // page_size)
  junk = np.array([0, int(tables[3, 1]), -1, 10**6])
  past = np.arange(tables.shape[1])[None, :] >= used[:, None]
  bad_tables = np.where(past, junk[np.arange(tables.size).reshape(tables.shape) % 4], tables)
  hidden = ~visible_rows[:, :, None, None]
  poison = np.where(np.arange(page_size)[None, :, None, None] % 2 == 0, np.nan, 1e30)
  k_bad = jnp.asarray(np.where(hidden, np.nan, np.asarray(k, np.float32)).astype(k.dtype))
  v_bad = jnp.asarray(np.where(hidden, poison, np.asarray(v, np.float32)).astype(v.dtype))
  out = _run(impl_mode, q, k_bad, v_bad, jnp.asarray(bad_tables, jnp.int32),
             jnp.asarray(lengths), sliding_window=window)
  ref = testing.float64_reference(_oracle, q, k, v, jnp.asarray(tables), jnp.asarray(lengths),
                                  sliding_window=window)
  testing.assert_close(out, ref, q.dtype)


def test_equals_dense_decode_attention(kernel_mode):
  """The same data as a dense cache through decode_attention's kernel: the same result, bit
  for bit (same blocks, splits and order of operations; only the addresses differ). The xla
  path is decode attention's reference on the gathered cache by construction."""
  q, k, v, tables = _inputs(7, 5, 8, 2, 64)
  lengths = jnp.array([64, 30, 5, 0, 47], jnp.int32)
  impl, interpret = kernel_mode
  dense_config = decode_cfg.DecodeAttentionConfig(**config_lib.as_dict(SMALL))
  dense = decode_attention(q, reference.gather_pages(k, tables),
                           reference.gather_pages(v, tables), lengths, impl=impl,
                           interpret=interpret, config=dense_config)
  paged = _run(kernel_mode, q, k, v, tables, lengths)
  np.testing.assert_array_equal(np.asarray(paged, np.float32), np.asarray(dense, np.float32))


@pytest.mark.slow
def test_jit_of_vmap_over_layers(impl_mode):
  """jit(vmap(...)) over a leading layer axis of pools, tables and lengths shared: each layer
  equals its own reference. The default (heuristic) config."""
  impl, interpret = impl_mode
  layers = [_inputs(seed, 2, 4, 2, 64, max_pages=3) for seed in (9, 10)]
  q, k, v = (jnp.stack(xs) for xs in list(zip(*layers))[:3])
  tables, lengths = layers[0][3], jnp.array([20, 47], jnp.int32)
  fn = functools.partial(paged_attention, impl=impl, interpret=interpret)
  out = np.asarray(jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None, None)))(q, k, v, tables,
                                                                          lengths))
  for layer in range(2):
    ref = testing.float64_reference(_oracle, q[layer], k[layer], v[layer], tables, lengths)
    testing.assert_close(out[layer], ref, q.dtype, what=f"layer {layer}")


@settings(deadline=None, max_examples=5, derandomize=True)
@given(lengths=st.lists(st.integers(0, 80), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_property_any_lengths_and_tables_match_reference(lengths, seed):
  """Any lengths (beyond the capacity of 64 they are clamped) over any permutation of the
  pool: the interpreted kernel matches the float64 reference. SMALL's one compiled kernel."""
  q, k, v, tables = _inputs(seed, 5, 8, 2, 64)
  _check(("triton", True), q, k, v, tables, jnp.array(lengths, jnp.int32))


def test_default_impl_on_cpu_is_xla_and_matches():
  q, k, v, tables = _inputs(11, 2, 4, 2, 64, max_pages=3)
  lengths = jnp.array([48, 5], jnp.int32)
  out = paged_attention(q, k, v, tables, lengths)
  testing.assert_close(out, testing.float64_reference(_oracle, q, k, v, tables, lengths),
                       q.dtype)


# ---- bad input --------------------------------------------------------------------------------

def _good():
  q = jnp.zeros((2, 8, 64), jnp.bfloat16)
  pages = jnp.zeros((5, 16, 2, 64), jnp.bfloat16)
  return q, pages, pages, jnp.zeros((2, 3), jnp.int32), jnp.array([3, 4], jnp.int32)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, r"`q` expected rank 3 \[batch, num_heads"),
    (lambda a: {**a, "k_pages": a["k_pages"][0]}, ValueError,
     r"`k_pages` expected rank 4 \[num_pages, page_size, num_kv_heads, head_dim\]"),
    (lambda a: {**a, "v_pages": a["v_pages"][:, :8]}, ValueError,
     r"`v_pages` expected shape \(5, 16, 2, 64\) \(the shape of `k_pages`\), got \(5, 8, 2, 64\)"),
    (lambda a: {**a, "k_pages": a["k_pages"][..., :32], "v_pages": a["v_pages"][..., :32]},
     ValueError, r"`k_pages` expected head_dim = q.shape\[2\] = 64 at axis 3"),
    (lambda a: {**a, "q": a["q"][:, :7]}, ValueError,
     r"`q` expected num_heads a multiple of num_kv_heads = 2 .*got num_heads = 7"),
    (lambda a: {**a, "k_pages": a["k_pages"][:0], "v_pages": a["v_pages"][:0]}, ValueError,
     r"`k_pages` expected every dimension .* >= 1, got shape \(0, 16, 2, 64\)"),
    (lambda a: {**a, "block_tables": a["block_tables"][0]}, ValueError,
     r"`block_tables` expected rank 2 \[batch, max_pages\], got shape \(3,\)"),
    (lambda a: {**a, "block_tables": a["block_tables"].astype(jnp.float32)}, TypeError,
     r"`block_tables` expected dtype int32, got float32"),
    (lambda a: {**a, "block_tables": a["block_tables"][:1]}, ValueError,
     r"`block_tables` expected batch = q.shape\[0\] = 2 at axis 0, got shape \(1, 3\)"),
    (lambda a: {**a, "block_tables": a["block_tables"][:, :0]}, ValueError,
     r"`block_tables` expected max_pages >= 1"),
    (lambda a: {**a, "block_tables": [[0, 1, 2], [3, 4, 0]]}, TypeError,
     r"`block_tables` expected an array, got list"),
    (lambda a: {**a, "lengths": a["lengths"].astype(jnp.float32)}, TypeError,
     r"`lengths` expected dtype int32, got float32"),
    (lambda a: {**a, "lengths": a["lengths"][:1]}, ValueError,
     r"`lengths` expected shape \(2,\) \[batch\], got \(1,\)"),
    (lambda a: {**a, "q": a["q"].astype(jnp.float32)}, TypeError,
     r"`q`, `k_pages`, `v_pages` expected one dtype, got q=float32"),
    (lambda a: {**a, "q": a["q"].astype(jnp.int32)}, TypeError, r"`q` expected dtype in"),
    (lambda a: {**a, "sliding_window": 0}, ValueError, r"`sliding_window` expected a positive int"),
    (lambda a: {**a, "logit_softcap": -1.0}, ValueError, r"`logit_softcap` expected a positive"),
    (lambda a: {**a, "scale": 0.0}, ValueError, r"`scale` expected a positive float"),
    (lambda a: {**a, "config": decode_cfg.DecodeAttentionConfig(16, 1, 4, 2)}, TypeError,
     r"`config` expected PagedAttentionConfig or None, got DecodeAttentionConfig"),
    (lambda a: {**a, "impl": "triton"}, ValueError, r"impl='triton' needs an NVIDIA GPU"),
    (lambda a: {**a, "q": a["q"][..., :8], "k_pages": a["k_pages"][..., :8],
                "v_pages": a["v_pages"][..., :8], "impl": "triton", "interpret": True},
     ValueError, r"head_dim 8 outside \[16, 256\] for the Triton kernel"),
], ids=lambda x: None)
def test_bad_input_errors_name_the_argument(change, error, match):
  q, k, v, tables, lengths = _good()
  args = change(dict(q=q, k_pages=k, v_pages=v, block_tables=tables, lengths=lengths))
  if args.get("impl") == "triton" and jax.devices()[0].platform == "gpu":
    pytest.skip("a GPU is present: impl='triton' is valid")
  with pytest.raises(error, match=r"paged_attention: .*" + match):
    paged_attention(**args)


def test_bad_config_values_name_the_paged_class():
  with pytest.raises(ValueError, match="PagedAttentionConfig: `block_k` expected a power of two "
                                       ">= 16, got 24"):
    PagedAttentionConfig(block_k=24, num_splits=1, num_warps=4, num_stages=2)


# ---- config: heuristic, tuning key, tuned table, autotune hooks -------------------------------

SM80, SM90 = targets.TARGETS["sm80"], targets.TARGETS["sm90"]


def test_heuristic_is_decode_attentions_over_the_table_capacity():
  h100 = device.Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024, 132)
  case = next(c for c in specs.CASES if c.label.startswith("llama3-8b paged16 decode b1 ctx 128k"))
  q, k_pages, _, tables, _ = case.abstract_inputs()
  paged = cfg.call_heuristic(h100, q, k_pages, tables)
  dense = decode_cfg.heuristic(h100, batch=1, num_kv_heads=8, max_len=131072, head_dim=128,
                               dtype=jnp.bfloat16)
  assert isinstance(paged, PagedAttentionConfig)
  assert config_lib.as_dict(paged) == config_lib.as_dict(dense)
  assert 8 * paged.num_splits >= 2 * 132  # batch 1 still fills two programs per SM
  found = cfg.candidates(h100, q, k_pages, None, tables)
  assert found[0] == paged and len(set(found)) == len(found) > 20
  assert cfg.autotune_default(h100, q, k_pages, None, tables, None) == paged


def test_config_resolution_reads_the_target_and_a_tuned_table_keyed_by_page_size(
    tmp_path, monkeypatch):
  q, k, _, tables, _ = _good()
  with targets.lowering_for(SM80):
    assert triton_impl.resolve_config(q, k, tables, None).num_stages == 2
  key = cfg.autotune_key("paged_attention", q, k, None, tables, None)
  assert key == {"head_dim": 64, "dtype": "bfloat16", "group": 4, "num_kv_heads": 2,
                 "max_len": 64, "batch": 2, "page_size": 16}
  tuned = PagedAttentionConfig(block_k=32, num_splits=5, num_warps=8, num_stages=4)
  monkeypatch.setattr(cfg, "OP_DIR", tmp_path)
  config_lib.write_table(tmp_path, "paged_attention", SM90.device_kind, jax.__version__,
                         [{"key": key, "config": config_lib.as_dict(tuned)}])
  with targets.lowering_for(SM90):
    assert triton_impl.resolve_config(q, k, tables, None) == tuned
    assert triton_impl.resolve_config(q, k, tables, SMALL) == SMALL
    # The same capacity (64 positions) in pages of 32: another key, so the heuristic's config.
    pages_of_32 = jax.ShapeDtypeStruct((5, 32, 2, 64), k.dtype)
    two_pages = jax.ShapeDtypeStruct((2, 2), jnp.int32)
    assert triton_impl.resolve_config(q, pages_of_32, two_pages, None).num_stages == 3


# ---- specs and offline CUDA lowering ----------------------------------------------------------

def test_specs_cases_are_consistent():
  labels = [c.label for c in specs.CASES]
  assert len(labels) == len(set(labels))
  assert any(c.audit for c in specs.CASES)
  for case in specs.CASES:
    q, k, v, tables, lengths = case.abstract_inputs()
    assert q.shape[0] == tables.shape[0] == lengths.shape[0] and k.shape == v.shape
    assert tables.dtype == lengths.dtype == jnp.int32
    assert case.bytes_moved > 0 and case.flops > 0
  llama = next(c for c in specs.CASES if c.label.startswith("llama3-8b paged16 decode b1 ctx 128k"))
  assert llama.bytes_moved == pytest.approx(2 * 131072 * 8 * 128 * 2, rel=1e-3)
  assert set(specs.peers()) == {"xla", "gather+decode", "jax-pallas"}


def test_specs_page_slots_are_disjoint_and_minus_one_past_lengths():
  slots = specs.page_slots(np.array([33, 0, 16, 1], np.int32), page_size=16, max_pages=3)
  np.testing.assert_array_equal(slots, [[0, 1, 2], [-1, -1, -1], [3, -1, -1], [4, -1, -1]])


@pytest.mark.slow
def test_specs_tables_give_each_sequence_its_own_pages():
  """The smallest audit case, built for real: a permutation of pages 1.., page 0 past lengths."""
  case = next(c for c in specs.CASES if c.label.startswith("audit smollm2"))
  q, k, v, tables, lengths = case.inputs()
  tables, lengths = np.asarray(tables), np.asarray(lengths)
  used = -(-lengths // k.shape[1])
  past = np.arange(tables.shape[1])[None, :] >= used[:, None]
  assert np.all(tables[past] == specs.SCRATCH_PAGE)
  assert sorted(tables[~past]) == list(range(1, k.shape[0]))


def test_lowers_for_cuda_sm90():
  case = next(c for c in specs.CASES if c.audit)
  args = case.abstract_inputs()
  fn = functools.partial(paged_attention, impl="triton", **case.kwargs)
  with targets.lowering_for(SM90):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text
