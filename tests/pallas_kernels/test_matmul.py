"""matmul (fused bias / activation / residual epilogue) and gated_matmul against float64 references.

Shapes are small and deliberately ragged (M, N, K not multiples of any block) so that every
masked edge of the kernel runs in interpret mode; explicit configs exercise the grouped tile
ordering with grids that are not multiples of group_m.
"""

import dataclasses
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import testing
from pallas_kernels._core import config as core_config
from pallas_kernels._core import device
from pallas_kernels.ops.matmul import MatmulConfig, gated_matmul, matmul
from pallas_kernels.ops.matmul import config as mm_config
from pallas_kernels.ops.matmul import reference, specs
from pallas_kernels.ops.matmul import triton as mm_triton

A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"


def _inputs(seed, lead, k, n, dtype, *, bias=False, residual=False, gated=False):
  """x [*lead, k], w [k, n] scaled to unit-variance outputs, optional bias / residual / w_up."""
  kx, kw, ku, kb, kr = testing.keys(seed, 5)
  out = {"x": testing.random_normal(kx, (*lead, k), dtype),
         "w": testing.random_normal(kw, (k, n), dtype, scale=k ** -0.5)}
  if gated:
    out["w_up"] = testing.random_normal(ku, (k, n), dtype, scale=k ** -0.5)
  if bias:
    out["bias"] = testing.random_normal(kb, (n,), dtype, scale=0.5)
  if residual:
    out["residual"] = testing.random_normal(kr, (*lead, n), dtype)
  return out


def _check_matmul(mode, a, *, activation=None, out_dtype=None, config=None, fn=None):
  impl, interpret = mode
  arrays = {name: a.get(name) for name in ("bias", "residual")}
  call = fn or (lambda x, w, **kw: matmul(x, w, **kw))
  out = call(a["x"], a["w"], activation=activation, out_dtype=out_dtype, impl=impl,
             interpret=interpret, config=config, **arrays)
  want_dtype = jnp.dtype(a["x"].dtype if out_dtype is None else out_dtype)
  assert out.dtype == want_dtype
  assert out.shape == (*a["x"].shape[:-1], a["w"].shape[1])
  ref = testing.float64_reference(reference.matmul, a["x"], a["w"], activation=activation,
                                  **arrays)
  testing.assert_close(out, ref, want_dtype, reduction_len=a["x"].shape[-1])


def _check_gated(mode, a, *, activation="silu", config=None):
  impl, interpret = mode
  out = gated_matmul(a["x"], a["w"], a["w_up"], activation=activation, impl=impl,
                     interpret=interpret, config=config)
  assert out.dtype == a["x"].dtype and out.shape == (*a["x"].shape[:-1], a["w"].shape[1])
  ref = testing.float64_reference(reference.gated_matmul, a["x"], a["w"], a["w_up"],
                                  activation=activation)
  testing.assert_close(out, ref, a["x"].dtype, reduction_len=a["x"].shape[-1])


# ---- numerics ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_ragged_shapes(impl_mode, dtype):
  """M, N, K that are multiples of nothing: every edge of the heuristic's tiles is masked."""
  _check_matmul(impl_mode, _inputs(1, (37,), 70, 50, dtype, bias=True))


def test_decode_single_row(impl_mode):
  """M = 1 (a GEMV: one valid row of a 16-row tile) with the residual epilogue."""
  _check_matmul(impl_mode, _inputs(2, (1,), 300, 200, jnp.bfloat16, residual=True))


def test_leading_dims(impl_mode):
  """x [B, T, K]: leading dims are flattened into M and restored on the output."""
  _check_matmul(impl_mode, _inputs(3, (2, 5), 40, 24, jnp.float32, bias=True, residual=True))


# Each activation with a different (bias, residual) pair, so the four combinations all run.
@pytest.mark.parametrize("activation,bias,residual", [
    (None, True, True), ("silu", False, False), ("gelu", True, False),
    ("gelu_tanh", False, True), ("relu", True, True)])
def test_epilogue(impl_mode, activation, bias, residual):
  a = _inputs(4, (24,), 48, 40, jnp.float32, bias=bias, residual=residual)
  _check_matmul(impl_mode, a, activation=activation)


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float16)])
def test_out_dtype(impl_mode, dtype, out_dtype):
  a = _inputs(5, (20,), 33, 18, dtype, bias=True, residual=True)
  _check_matmul(impl_mode, a, activation="silu", out_dtype=out_dtype)


@pytest.mark.parametrize("activation,dtype", [
    ("silu", jnp.bfloat16), ("gelu_tanh", jnp.float16), ("gelu", jnp.float32)])
def test_gated(impl_mode, activation, dtype):
  _check_gated(impl_mode, _inputs(6, (3, 7), 45, 36, dtype, gated=True), activation=activation)


# grid_m x grid_n with grid_m not a multiple of group_m (a short last group), group_m = 1
# (row-major), and group_m larger than grid_m (one group).
SWIZZLE_CONFIGS = [
    MatmulConfig(16, 16, 16, group_m=3, num_warps=4, num_stages=2),  # grid 7 x 6
    MatmulConfig(16, 32, 32, group_m=1, num_warps=4, num_stages=2),  # grid 7 x 3
    MatmulConfig(32, 64, 16, group_m=16, num_warps=4, num_stages=2),  # grid 4 x 2
]


@pytest.mark.parametrize("config", SWIZZLE_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}g{c.group_m}")
def test_configs_and_swizzle(kernel_mode, config):
  _check_matmul(kernel_mode, _inputs(7, (100,), 40, 90, jnp.float32, bias=True, residual=True),
                activation="relu", config=config)


def test_gated_short_last_group(kernel_mode):
  config = MatmulConfig(16, 16, 16, group_m=4, num_warps=4, num_stages=2)  # grid 5 x 3
  _check_gated(kernel_mode, _inputs(8, (70,), 20, 40, jnp.float32, gated=True), config=config)


@pytest.mark.parametrize("grid_m,grid_n,group_m", [
    (1, 1, 8), (7, 6, 3), (7, 6, 1), (5, 1, 4), (1, 9, 4), (10, 3, 4), (4, 5, 8)])
def test_grouped_tile_order_is_a_permutation(grid_m, grid_n, group_m):
  """Every program gets a distinct in-range tile, and programs run down group_m rows first."""
  num_tiles = grid_m * grid_n
  pids = jnp.arange(64, dtype=jnp.int32)  # one shape for every case: one eager compile
  rows, cols = mm_triton._grouped_tile(pids, grid_m=grid_m, grid_n=grid_n, group_m=group_m)
  rows, cols = np.asarray(rows)[:num_tiles].tolist(), np.asarray(cols)[:num_tiles].tolist()
  assert sorted(zip(rows, cols)) == [(i, j) for i in range(grid_m) for j in range(grid_n)]
  first_group = min(group_m, grid_m)
  assert rows[:first_group] == list(range(first_group)) and cols[:first_group] == [0] * first_group


def test_jit_and_vmap(kernel_mode):
  impl, interpret = kernel_mode
  config = MatmulConfig(16, 16, 16, group_m=2, num_warps=4, num_stages=2)
  a = _inputs(9, (3, 5), 40, 24, jnp.float32, bias=True)
  mm = jax.jit(lambda x, w, b: matmul(x, w, bias=b, activation="gelu_tanh", impl=impl,
                                      interpret=interpret, config=config))
  ref = testing.float64_reference(reference.matmul, a["x"], a["w"], bias=a["bias"],
                                  activation="gelu_tanh")
  testing.assert_close(mm(a["x"], a["w"], a["bias"]), ref, jnp.float32, reduction_len=40)
  # vmap over x only (w and bias shared), then over x and both weights of the gated matmul.
  out = jax.vmap(mm, in_axes=(0, None, None))(a["x"], a["w"], a["bias"])
  testing.assert_close(out, ref, jnp.float32, reduction_len=40)
  g = _inputs(10, (3, 5), 40, 24, jnp.float32, gated=True)
  ws = jnp.stack([g["w"], g["w"] * 0.5, -g["w"]])
  ups = jnp.stack([g["w_up"], -g["w_up"], g["w_up"] * 2])
  gm = jax.jit(jax.vmap(lambda x, w, u: gated_matmul(x, w, u, impl=impl, interpret=interpret,
                                                    config=config)))
  ref = np.stack([testing.float64_reference(reference.gated_matmul, g["x"][i], ws[i], ups[i])
                  for i in range(3)])
  testing.assert_close(gm(g["x"], ws, ups), ref, jnp.float32, reduction_len=40)


def _pallas_grids(fn, *args):
  return re.findall(r"grid=\(([^)]*)\)", str(jax.make_jaxpr(fn)(*args)))


def test_vmap_over_rows_folds_into_one_launch():
  """vmap over x (and/or residual) with shared weights becomes more rows of one launch, which
  streams the weights once; batched weights keep Pallas's batch grid axis."""
  a = _inputs(16, (3, 5), 40, 24, jnp.float32, bias=True, residual=True, gated=True)
  config = MatmulConfig(16, 16, 16)
  mm = lambda x, w, b, r: matmul(x, w, bias=b, residual=r, impl="triton", interpret=True,
                                 config=config)
  gm = lambda x, w, u: gated_matmul(x, w, u, impl="triton", interpret=True, config=config)
  x, w, b, r = a["x"], a["w"], a["bias"], a["residual"]
  assert _pallas_grids(jax.vmap(mm, (0, None, None, None)), x, w, b, r[0]) == ["2,"]  # M = 15
  assert _pallas_grids(jax.vmap(mm, (None, None, None, 0)), x[0], w, b, r) == ["2,"]
  assert _pallas_grids(jax.vmap(gm, (0, None, None)), x, w, a["w_up"]) == ["2,"]
  ws = jnp.stack([w] * 3)
  assert _pallas_grids(jax.vmap(mm, (0, 0, None, 0)), x, ws, b, r) == ["3, 2"]


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 40),
                  activation=st.sampled_from(reference.ACTIVATIONS), bias=st.booleans(),
                  residual=st.booleans(), seed=st.integers(0, 2**16))
def test_property_any_shape(m, n, k, activation, bias, residual, seed):
  """Any M, N, K >= 1 (including below the 16-wide minimum tile) and any epilogue."""
  a = _inputs(seed, (m,), k, n, jnp.float32, bias=bias, residual=residual)
  _check_matmul(("triton", True), a, activation=activation)


def test_empty_rows():
  a = _inputs(11, (0,), 16, 8, jnp.float32, bias=True)
  out = matmul(a["x"], a["w"], bias=a["bias"], impl="triton", interpret=True)
  assert out.shape == (0, 8)


# ---- bad input ---------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
  # Validation reads only shapes and dtypes, so host arrays do (and cost no compiles).
  def arr(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)
  x, w = arr(4, 8), arr(8, 6)
  a = {"bias": arr(6), "residual": arr(4, 6)}
  cases = [
      (ValueError, r"matmul: `x` expected rank >= 2 \[..., K\].*got shape \(8,\)",
       lambda: matmul(x[0], w)),
      (ValueError, r"`w` expected rank 2 \[K, N\], got shape \(8, 6, 1\)",
       lambda: matmul(x, w[..., None])),
      (ValueError, r"`w` expected K = x.shape\[-1\].*`x`'s last axis\) = 8 at axis 0, got shape \(7, 6\)",
       lambda: matmul(x, w[:7])),
      (ValueError, r"`bias` expected shape \(6,\) \(\[N\], N = w.shape\[1\] = 6\), got \(5,\)",
       lambda: matmul(x, w, bias=a["bias"][:5])),
      (ValueError, r"`residual` expected shape \(4, 6\).*got \(4, 5\)",
       lambda: matmul(x, w, residual=a["residual"][:, :5])),
      (ValueError, r"`activation` expected one of \(None, 'silu', 'gelu', 'gelu_tanh', 'relu'\), got 'swish'",
       lambda: matmul(x, w, activation="swish")),
      (TypeError, r"`x`, `w`, `bias`, `residual` expected one dtype, got x=float32, w=bfloat16",
       lambda: matmul(x, w.astype(jnp.bfloat16))),
      (TypeError, r"`bias`.*expected one dtype, got x=float32, w=float32, bias=float16",
       lambda: matmul(x, w, bias=a["bias"].astype(jnp.float16))),
      (TypeError, r"`x` expected dtype in \(float32, bfloat16, float16\), got int32",
       lambda: matmul(x.astype(jnp.int32), w)),
      (TypeError, r"`out_dtype` expected None or one of \(float32, bfloat16, float16\), got 'int8'",
       lambda: matmul(x, w, out_dtype="int8")),
      (TypeError, r"`out_dtype` expected None or one of .* got 'bogus'",
       lambda: matmul(x, w, out_dtype="bogus")),
      (TypeError, r"`config` expected MatmulConfig or MosaicMatmulConfig or None, got dict",
       lambda: matmul(x, w, config={"block_m": 16})),
      (TypeError, r"`w` expected an array, got list", lambda: matmul(x, [[1.0]])),
      (ValueError, r"impl='mosaic' needs an NVIDIA GPU.*interpret=True",
       lambda: matmul(x, w, impl="mosaic")),
      (ValueError, r"impl='triton' needs an NVIDIA GPU.*interpret=True",
       lambda: matmul(x, w, impl="triton")),
  ]
  g = {"x": x, "w": w, "w_up": arr(8, 6)}
  cases += [
      (ValueError, r"gated_matmul: `w_up` expected shape \(8, 6\) \(the shape of `w_gate`\), got \(8, 5\)",
       lambda: gated_matmul(g["x"], g["w"], g["w_up"][:, :5])),
      (ValueError, r"gated_matmul: `w_gate` expected K = x.shape\[-1\].*= 8 at axis 0",
       lambda: gated_matmul(g["x"], g["w"][:4], g["w_up"])),
      (TypeError, r"gated_matmul: `x`, `w_gate`, `w_up` expected one dtype",
       lambda: gated_matmul(g["x"], g["w"], g["w_up"].astype(jnp.float16))),
      (ValueError, r"gated_matmul: `activation` expected one of .*got 'tanh'",
       lambda: gated_matmul(g["x"], g["w"], g["w_up"], activation="tanh")),
  ]
  if device.current_target().is_gpu:  # the "needs a GPU" refusal only exists off-GPU
    cases = [c for c in cases if "needs an NVIDIA GPU" not in c[1]]
  for error, pattern, call in cases:
    with pytest.raises(error, match=pattern):
      call()


@pytest.mark.parametrize("field,value,pattern", [
    ("block_m", 96, r"`block_m` expected a power of two >= 16, got 96"),
    ("block_k", 8, r"`block_k` expected a power of two >= 16, got 8"),
    ("group_m", 0, r"`group_m` expected a positive int, got 0"),
    ("num_warps", 3, r"`num_warps` expected a power of two <= 16, got 3"),
    ("num_stages", True, r"`num_stages` expected a positive int, got True"),
])
def test_config_validation(field, value, pattern):
  good = dict(block_m=16, block_n=16, block_k=16, group_m=8, num_warps=4, num_stages=2)
  with pytest.raises(ValueError, match=pattern):
    MatmulConfig(**{**good, field: value})


# ---- config heuristic and resolution -----------------------------------------------------

def _target(kind):
  return device._gpu_target(kind, None)


@pytest.mark.parametrize("kind", [A100, H100])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m", [1, 8, 32, 64, 200, 512, 8192])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_heuristic_fits_shared_memory(kind, gated, m, dtype):
  target = _target(kind)
  cfg = mm_config.heuristic(target, m, 14336, 4096, dtype, gated)
  weights = 2 if gated else 1
  itemsize = jnp.dtype(dtype).itemsize
  assert mm_config.smem_bytes(cfg, itemsize, weights) <= target.max_shared_memory_bytes
  # At most 128 fp32 accumulator values per thread: the offline audit saw more spill.
  assert cfg.block_m * cfg.block_n * weights <= 128 * 32 * cfg.num_warps
  if m <= mm_config.DECODE_MAX_M:  # decode: the smallest tile row count that holds M
    assert cfg.block_m == max(16, mm_config.next_power_of_2(m))
    assert cfg.block_k >= cfg.block_m
  else:
    assert cfg.block_m >= 64


def test_heuristic_decode_spreads_over_sms():
  """A GEMV needs ~one program per SM: narrow N tiles when N is small, wide when it is huge."""
  h100 = _target(H100)
  assert mm_config.heuristic(h100, 1, 4096, 14336, jnp.bfloat16, False).block_n == 32
  assert mm_config.heuristic(h100, 1, 128256, 4096, jnp.bfloat16, False).block_n == 64


def test_heuristic_clamps_to_small_problems():
  cfg = mm_config.heuristic(_target(H100), 3, 20, 10, jnp.float16, False)
  assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 32, 16)


@pytest.mark.parametrize("kind", [A100, H100])
@pytest.mark.parametrize("m,gated", [(1, False), (32, True), (2048, False), (2048, True)])
def test_autotune_candidates(kind, m, gated):
  """The autotune hook: the heuristic first, then distinct configs that all fit the target."""
  target = _target(kind)
  s = jax.ShapeDtypeStruct
  x, w = s((m, 4096), jnp.bfloat16), s((4096, 14336), jnp.bfloat16)
  found = mm_config.candidates(target, x, w, *([w] if gated else []))
  assert found[0] == mm_config.heuristic(target, m, 14336, 4096, jnp.bfloat16, gated)
  assert len(found) == len(set(found)) >= 4
  for cfg in found:
    assert mm_config.smem_bytes(cfg, 2, 2 if gated else 1) <= target.max_shared_memory_bytes
    if m <= mm_config.DECODE_MAX_M:
      assert cfg.block_m == found[0].block_m


def test_tuning_key_and_tuned_table(tmp_path, monkeypatch):
  assert mm_config.tuning_key(1, 64, 32, jnp.bfloat16, True) == {
      "dtype": "bfloat16", "m": 16, "n": 64, "k": 32, "gated": True}
  assert mm_config.tuning_key(300, 64, 32, jnp.float32, False)["m"] == 512
  monkeypatch.setattr(mm_config, "OP_DIR", tmp_path)
  tuned = MatmulConfig(32, 64, 128, group_m=4, num_warps=8, num_stages=3)
  key = mm_config.tuning_key(300, 64, 32, jnp.bfloat16, False)
  core_config.write_table(tmp_path, "matmul", H100, jax.__version__,
                          [{"key": key, "config": dataclasses.asdict(tuned)}])
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=jax.sharding.AbstractDevice(
                                       device_kind=H100, num_cores=132, platform="gpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    assert mm_config.resolve(None, 300, 64, 32, jnp.bfloat16, False) == tuned
    assert mm_config.resolve(None, 3000, 64, 32, jnp.bfloat16, False) != tuned


# ---- shape catalogue and offline lowering ------------------------------------------------

def test_specs_catalogue():
  audit = [c for c in specs.CASES if c.audit]
  assert {c.op for c in audit} == {"matmul", "gated_matmul"}
  assert {jnp.dtype(c.abstract_inputs()[0].dtype).name for c in audit} == {"bfloat16", "float16"}
  ms = {c.abstract_inputs()[0].shape[0] for c in audit}
  assert min(ms) <= 8 and max(ms) >= 2048
  assert any(c.array_kwargs for c in audit) and any(c.kwargs.get("activation") for c in audit)
  for case in audit + specs.CASES[:3]:
    inputs = case.abstract_inputs()
    args, kwargs = case.bind(inputs)
    (m, k), n = args[0].shape, args[1].shape[1]
    weights = 2 if case.op == "gated_matmul" else 1
    assert case.flops == 2 * weights * m * n * k
    assert case.bytes_moved >= weights * k * n * args[1].dtype.itemsize
    assert set(kwargs) <= {"activation", "bias", "residual"}
  assert "xla" in specs.peers()
  assert len({c.label for c in specs.CASES}) == len(specs.CASES)


def _lower_for(kind, case):
  fn = matmul if case.op == "matmul" else gated_matmul
  inputs = case.abstract_inputs()  # built outside the abstract mesh

  def call(*arrays):
    args, kwargs = case.bind(arrays)
    return fn(*args, **kwargs)  # impl=None: the GPU default, triton

  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=jax.sharding.AbstractDevice(
                                       device_kind=kind, num_cores=132, platform="gpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(call).trace(*inputs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kind", [A100, H100])
def test_every_audit_case_lowers_for_cuda(kind):
  """The audit set lowers through Triton for sm_80 and sm_90 (tracing only: ~1 s on CPU)."""
  for case in (c for c in specs.CASES if c.audit):
    assert "__gpu$xla.gpu.triton" in _lower_for(kind, case), case.label


# ---- heavier numerics (slow) -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_heuristic_configs_at_model_widths(kernel_mode, dtype):
  """SmolLM2-width K or N (576) at decode and small-prefill M, with the heuristic configs."""
  for m in (1, 33, 130):
    _check_matmul(kernel_mode, _inputs(14, (m,), 576, 192, dtype, bias=True, residual=True),
                  activation="gelu")
    _check_gated(kernel_mode, _inputs(15, (m,), 192, 576, dtype, gated=True))
