"""impl="mosaic": the Hopper matmul / gated matmul (Mosaic GPU) in Mosaic GPU interpret mode,
their gradients through the Triton backward, refusals, dispatch, and the CUDA lowering.

Every output is compared with a float64 evaluation of the reference on fresh random inputs
(relative Frobenius error, NaN never passes; the interpreter leaves unwritten output as NaN,
see `test_attention_mosaic.test_interpreter_poisons_unwritten_output`). The interpreter models
SMEM, barriers and TMA, so the producer/consumer ring itself is exercised: a barrier phase a
thread skips, or a slot refilled before both consumers released it, fails. It is slow (seconds
per program on one core): shapes are small, 64-wide tiles and 2 stages make K loops wrap the
ring and grids hold several tiles.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import testing
from pallas_kernels._core import device, dispatch
from pallas_kernels.ops.matmul import MatmulConfig, api, gated_matmul, matmul, mosaic, reference
from pallas_kernels.ops.matmul import specs
from tests.pallas_kernels.test_matmul import _inputs as forward_inputs

# 64-wide tiles, 2 stages: K = 192 is three K steps through a two-slot ring; 3 persistent
# programs, so a program runs several tiles (the ring and the staging tiles carry over).
SMALL = mosaic.MosaicMatmulConfig(block_m=128, block_n=64, block_k=64, num_stages=2, group_m=2,
                                  num_programs=3)
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
# Interpret mode here; the compiled kernel on a Hopper GPU (skipped, visibly, without one).
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=[
             pytest.mark.gpu, pytest.mark.skipif(not device.current_target().is_hopper,
                                                 reason="needs a Hopper GPU")])]


def _inputs(seed, lead, k, n, dtype=jnp.bfloat16, **kwargs):
  """The forward tests' inputs (bf16 unless told): x, w, optional bias / residual / w_up."""
  return forward_inputs(seed, lead, k, n, dtype, **kwargs)


def _check_matmul(a, *, activation=None, out_dtype=None, config=SMALL, interpret=True):
  arrays = {name: a[name] for name in ("bias", "residual") if name in a}
  out = matmul(a["x"], a["w"], activation=activation, out_dtype=out_dtype, impl="mosaic",
               interpret=interpret, config=config, **arrays)
  want = jnp.dtype(a["x"].dtype if out_dtype is None else out_dtype)
  assert out.dtype == want and out.shape == (*a["x"].shape[:-1], a["w"].shape[1])
  ref = testing.float64_reference(reference.matmul, a["x"], a["w"], activation=activation,
                                  **arrays)
  testing.assert_close(out, ref, want, reduction_len=a["x"].shape[-1])


def _check_gated(a, *, activation="silu", config=SMALL, interpret=True):
  out = gated_matmul(a["x"], a["w"], a["w_up"], activation=activation, impl="mosaic",
                     interpret=interpret, config=config)
  assert out.dtype == a["x"].dtype and out.shape == (*a["x"].shape[:-1], a["w"].shape[1])
  ref = testing.float64_reference(reference.gated_matmul, a["x"], a["w"], a["w_up"],
                                  activation=activation)
  testing.assert_close(out, ref, a["x"].dtype, reduction_len=a["x"].shape[-1])


# ---- numerics ----------------------------------------------------------------------------

@pytest.mark.parametrize("interpret", MODES)
def test_plain_bf16_m_tail_grid_and_ring(interpret):
  # M = 200: a second row tile with 72 valid rows (TMA zero-fill / dropped writes); 2 x 3
  # tiles in grouped order, two per program; three K steps a tile through two ring slots.
  _check_matmul(_inputs(1, (200,), 192, 192), interpret=interpret)


@pytest.mark.parametrize("interpret", MODES)
def test_decode_single_row_fp16_residual(interpret):
  # M = 1: one valid row of a 128-row tile, with the residual prefetch.
  _check_matmul(_inputs(2, (1,), 128, 128, jnp.float16, residual=True), interpret=interpret)


def test_rows_not_multiple_of_8_leading_dims_default_config():
  # x [2, 10, K]: M = 20 > 8 and not a multiple of 8 (the padded path, `mosaic._tma_rows`);
  # the heuristic config (128 x 128 tiles, so N = 64 is a partial column tile).
  _check_matmul(_inputs(3, (2, 10), 64, 64, bias=True, residual=True), activation="silu",
                config=None)


# Each activation with a different (bias, residual) pair, so all four combinations run.
@pytest.mark.parametrize("activation,bias,residual", [
    (None, True, True), ("silu", False, False), ("gelu", True, False),
    ("gelu_tanh", False, True), ("relu", True, True)])
def test_epilogue(activation, bias, residual):
  _check_matmul(_inputs(4, (40,), 128, 64, bias=bias, residual=residual), activation=activation)


def test_out_dtype_float32_with_residual():
  # out_dtype != x.dtype: the residual takes its own x.dtype SMEM tile.
  _check_matmul(_inputs(5, (24,), 128, 64, bias=True, residual=True), activation="gelu_tanh",
                out_dtype=jnp.float32)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("activation,dtype", [("silu", jnp.bfloat16),
                                              ("gelu_tanh", jnp.float16)])
def test_gated(interpret, activation, dtype):
  # Two accumulators per consumer, three copies per ring slot; M tail; 2 x 2 tiles over
  # 3 programs (one runs two tiles, the others one).
  _check_gated(_inputs(6, (3, 50), 128, 128, dtype, gated=True), activation=activation,
               interpret=interpret)


def test_vmap_folds_into_rows():
  a = _inputs(7, (3, 8), 64, 64, residual=True)
  fn = functools.partial(matmul, impl="mosaic", interpret=True, config=SMALL)
  out = jax.vmap(lambda x, r: fn(x, a["w"], residual=r))(a["x"], a["residual"])
  ref = testing.float64_reference(reference.matmul, a["x"], a["w"], residual=a["residual"])
  testing.assert_close(out, ref, jnp.bfloat16)


def _reference_vjp(fn, args, cotangent):
  _, pullback = jax.vjp(fn, *args)
  return pullback(cotangent)


@pytest.mark.parametrize("interpret", MODES)
def test_grad_mosaic_forward_triton_backward(interpret):
  # jax.vjp through the public op: the Mosaic forward saves the pre-activation (through its
  # SMEM staging tile), the Triton backward forms dx, dw, dbias, dresidual.
  a = _inputs(8, (2, 10), 128, 64, bias=True, residual=True)
  g = testing.random_normal(testing.keys(9, 1)[0], (2, 10, 64), jnp.bfloat16)
  args = (a["x"], a["w"], a["bias"], a["residual"])

  def fn(x, w, bias, residual, op=functools.partial(matmul, impl="mosaic", interpret=interpret,
                                                     config=SMALL)):
    return op(x, w, bias=bias, residual=residual, activation="gelu")
  out, pullback = jax.vjp(fn, *args)
  refs = testing.float64_reference(
      lambda *xs: _reference_vjp(functools.partial(fn, op=reference.matmul), xs[:4], xs[4]),
      *args, g)
  testing.assert_close(out, testing.float64_reference(functools.partial(fn, op=reference.matmul),
                                                      *args), jnp.bfloat16)
  for name, grad, ref, arg in zip(("dx", "dw", "dbias", "dresidual"), pullback(g), refs, args):
    assert grad.shape == arg.shape and grad.dtype == arg.dtype, name
    testing.assert_close(grad, ref, arg.dtype, reduction_len=128, what=name)


@pytest.mark.slow
def test_grad_gated():
  a = _inputs(10, (20,), 128, 64, gated=True)
  g = testing.random_normal(testing.keys(11, 1)[0], (20, 64), jnp.bfloat16)
  args = (a["x"], a["w"], a["w_up"])
  fn = functools.partial(gated_matmul, impl="mosaic", interpret=True, config=SMALL)
  _, pullback = jax.vjp(fn, *args)
  refs = testing.float64_reference(
      lambda *xs: _reference_vjp(reference.gated_matmul, xs[:3], xs[3]), *args, g)
  for name, grad, ref, arg in zip(("dx", "dw_gate", "dw_up"), pullback(g), refs, args):
    assert grad.shape == arg.shape and grad.dtype == arg.dtype, name
    testing.assert_close(grad, ref, arg.dtype, reduction_len=128, what=name)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    mosaic.MosaicMatmulConfig(256, 128, 64, 2, group_m=1),  # 128-row consumers (wgmma M 128)
    mosaic.MosaicMatmulConfig(128, 256, 32, 3, group_m=3),  # wgmma N 256, 64-byte x swizzle
    # N tile not a power of two; 4 K steps < 6 stages, 3 tiles a program
    mosaic.MosaicMatmulConfig(128, 192, 64, 6, num_programs=2),
], ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}s{c.num_stages}g{c.group_m}"
                 f"p{c.num_programs}")
def test_other_tiles(config):
  _check_matmul(_inputs(12, (300,), 256, 384, bias=True, residual=True), activation="relu",
                config=config)


@pytest.mark.slow
def test_no_races_detected():
  # The interpreter's race detector: one program runs both tiles (3 K steps each, 2 ring
  # slots), with the residual and bias prefetch and the saved pre-activation through the shared
  # staging tile, so tile 2's prefetch lands where tile 1's stores read.
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # private: no public API
  a = _inputs(13, (130,), 192, 64, bias=True, residual=True)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    out, z = mosaic._matmul(a["x"], a["residual"], a["w"], a["bias"], activation="silu",
                            out_dtype=jnp.bfloat16, interpret=False,
                            config=dataclasses.replace(SMALL, num_programs=1),
                            save_preact=True)
    out.block_until_ready()
  assert not interpret_pallas_call.get_races().races_found
  testing.assert_close(out, testing.float64_reference(
      reference.matmul, a["x"], a["w"], bias=a["bias"], residual=a["residual"],
      activation="silu"), jnp.bfloat16)
  testing.assert_close(z, testing.float64_reference(reference.matmul, a["x"], a["w"],
                                                    bias=a["bias"]), jnp.bfloat16)


# ---- refusals, configs, dispatch ----------------------------------------------------------

@pytest.mark.parametrize("dtype,k,n,config,match", [
    (jnp.float32, 64, 64, None,
     r"impl='mosaic' supports bfloat16/float16 .* got float32; use impl='triton'"),
    (jnp.bfloat16, 96, 64, None, r"needs K and N multiples of 64 .* got K=96, N=64"),
    (jnp.float16, 64, 48, None, r"needs K and N multiples of 64 .* got K=64, N=48"),
    (jnp.bfloat16, 64, 64, MatmulConfig(64, 64, 64),
     r"impl='mosaic' takes config=MosaicMatmulConfig or None, got MatmulConfig"),
])
def test_refusals_say_why(dtype, k, n, config, match):
  x, w = jnp.zeros((8, k), dtype), jnp.zeros((k, n), dtype)
  with pytest.raises(ValueError, match=match):
    matmul(x, w, impl="mosaic", interpret=True, config=config)
  with pytest.raises(ValueError, match=match):
    gated_matmul(x, w, w, impl="mosaic", interpret=True, config=config)


def test_config_type_picks_or_refuses_the_impl():
  x, w = jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((64, 64), jnp.bfloat16)
  pick = functools.partial(dispatch.select, "matmul")
  # impl=None with a Mosaic config: Triton refuses it, so the Mosaic kernel is chosen.
  assert pick(None, True, api._MATMUL_IMPLS, x, w, config=SMALL).name == "mosaic"
  assert dispatch.select("gated_matmul", None, True, api._GATED_IMPLS, x, w, w,
                         config=SMALL).name == "mosaic"
  with pytest.raises(ValueError, match="impl='triton' takes a MatmulConfig, "
                                       "got config=MosaicMatmulConfig"):
    matmul(x, w, impl="triton", interpret=True, config=SMALL)
  with pytest.raises(TypeError, match="`config` expected MatmulConfig or MosaicMatmulConfig "
                                      "or None, got dict"):
    matmul(x, w, interpret=True, config={"block_m": 128})


def test_dispatch_default_stays_triton_and_mosaic_needs_hopper():
  x, w = jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((64, 64), jnp.bfloat16)
  pick = functools.partial(dispatch.select, "matmul")
  for impls in (api._MATMUL_IMPLS, api._GATED_IMPLS):
    assert [c.name for c in impls] == ["triton", "mosaic", "xla"]
  assert pick(None, True, api._MATMUL_IMPLS, x, w).name == "triton"
  with testing.abstract_gpu(A100, 108):
    with pytest.raises(ValueError, match="impl='mosaic' needs a Hopper GPU"):
      pick("mosaic", False, api._MATMUL_IMPLS, x, w)
  with testing.abstract_gpu(H100, 132):
    assert pick("mosaic", False, api._MATMUL_IMPLS, x, w).name == "mosaic"
    assert pick(None, False, api._MATMUL_IMPLS, x, w).name == "triton"


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_m=64), "`block_m` expected 128 or 256"),
    (dict(block_n=96), "`block_n` expected a multiple of 64 in \\[64, 256\\]"),
    (dict(block_n=320), "`block_n` expected a multiple of 64"),
    (dict(block_k=128), "`block_k` expected 32 or 64"),
    (dict(num_stages=1), "`num_stages` expected an int in \\[2, 6\\]"),
    (dict(group_m=0), "`group_m` expected a positive int"),
    (dict(num_programs=0), "`num_programs` expected a positive int"),
    (dict(block_m=128.0), "`block_m` expected an int"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mosaic.MosaicMatmulConfig(**kwargs)


def test_heuristic_fits_every_spec_shape():
  # Every catalogue case the kernel accepts: the heuristic's SMEM (227 KB a block) and at most
  # 128 fp32 accumulator registers a consumer thread (of the 232 it gets).
  for layer in specs.LAYERS:
    for m in specs.DECODE_M + specs.PREFILL_M:
      for dtype in (jnp.bfloat16, jnp.float16):
        cfg = mosaic.heuristic(m, layer.n, layer.k, dtype, gated=layer.gated,
                               bias=layer.bias, residual=layer.residual)
        weights = 2 if layer.gated else 1
        where = (layer.model, layer.name, m, cfg)
        assert mosaic.shared_memory_bytes(cfg, dtype, weights=weights, bias=layer.bias,
                                          residual=layer.residual) <= mosaic.SMEM_LIMIT_BYTES, where
        assert mosaic.accumulator_registers(cfg, weights) <= 128, where


# ---- offline CUDA lowering (GPU-OFFLINE.md section 2): Pallas lowers the kernel all the way to
# an NVVM-dialect module inside a `mosaic_gpu_v2` custom call, checking layouts, wgmma shapes,
# TMA descriptors and the shared-memory budget on the way. PTX and registers need a GPU machine.

def _lower_for_h100(m, k, n, *, gated=False, dtype=jnp.bfloat16, **kwargs):
  x, w = jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), dtype)
  arrays = {name: kwargs.pop(name) for name in ("bias", "residual") if name in kwargs}
  if gated:
    fn = functools.partial(gated_matmul, impl="mosaic", **kwargs)
    args = (x, w, w)
  else:
    fn = lambda x, w, **arrays: matmul(x, w, impl="mosaic", **kwargs, **arrays)  # noqa: E731
    args = (x, w)
  arrays = {name: jax.ShapeDtypeStruct(a.shape, a.dtype) for name, a in arrays.items()}
  with testing.abstract_gpu(H100, 132):
    return jax.jit(fn).trace(*args, **arrays).lower(lowering_platforms=("cuda",)).as_text()


def test_lowers_for_h100_llama3_8b_prefill():
  # llama3-8b down_proj-shaped prefill (M 2048, K 4096, N 4096): heuristic 128 x 256 x 64.
  text = _lower_for_h100(2048, 4096, 4096)
  assert "stablehlo.custom_call @mosaic_gpu_v2" in text
  assert "__gpu$xla.gpu.triton" not in text  # the forward alone: no backward was traced


def test_lowers_for_h100_epilogue_ragged_rows():
  bias = jnp.zeros((512,), jnp.bfloat16)
  residual = jnp.zeros((300, 512), jnp.bfloat16)
  text = _lower_for_h100(300, 256, 512, bias=bias, residual=residual, activation="gelu")
  assert "stablehlo.custom_call @mosaic_gpu_v2" in text


@pytest.mark.slow
@pytest.mark.parametrize("activation", [None, "silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_lowers_for_h100_every_epilogue(activation, out_dtype):
  residual = jnp.zeros((1, 1024), jnp.float16)
  text = _lower_for_h100(1, 512, 1024, dtype=jnp.float16, residual=residual,
                         bias=jnp.zeros((1024,), jnp.float16), activation=activation,
                         out_dtype=out_dtype)
  assert "stablehlo.custom_call @mosaic_gpu_v2" in text


@pytest.mark.slow
def test_lowers_for_h100_gated_and_grad():
  text = _lower_for_h100(2048, 4096, 14336, gated=True)
  assert "stablehlo.custom_call @mosaic_gpu_v2" in text
  x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
  loss = lambda x, w: matmul(x, w, activation="silu", impl="mosaic").astype(  # noqa: E731
      jnp.float32).sum()
  with testing.abstract_gpu(H100, 132):
    text = jax.jit(jax.grad(loss, (0, 1))).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu_v2" in text and "__gpu$xla.gpu.triton" in text  # Mosaic fwd, Triton bwd


@pytest.mark.slow
def test_shared_memory_estimate_matches_the_lowering():
  # The lowering refuses a kernel over 227 KB and reports its exact size: our estimate (used
  # by the heuristic and in the notes) is within 512 B of it.
  cases = [(mosaic.MosaicMatmulConfig(256, 256, 64, 2), {}),
           (mosaic.MosaicMatmulConfig(128, 256, 64, 4), dict(bias=True, residual=True))]
  for cfg, flags in cases:
    extra = {}
    if flags:
      extra = dict(bias=jnp.zeros((1024,), jnp.bfloat16),
                   residual=jnp.zeros((1024, 1024), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"exceeds available shared memory") as err:
      _lower_for_h100(1024, 1024, 1024, config=cfg, **extra)
    actual = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    estimate = mosaic.shared_memory_bytes(cfg, jnp.bfloat16, **flags)
    assert abs(actual - estimate) <= 512, (cfg, actual, estimate)
