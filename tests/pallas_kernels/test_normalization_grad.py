"""Gradients of rms_norm / layer_norm (custom_vjp + Pallas backward kernel) against float64
autodiff of the references, on random inputs and random cotangents.

The references themselves are checked against central finite differences in float64, so the
oracle the kernels are held to is a checked one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import testing
from pallas_kernels.ops.normalization import layer_norm, reference, rms_norm, specs
from pallas_kernels.ops.normalization import config as norm_config
from pallas_kernels.ops.normalization import triton as norm_triton

OPS = {"rms": (rms_norm, reference.rms_norm), "layer": (layer_norm, reference.layer_norm)}
EPS = {"rms": 1e-6, "layer": 1e-5}


def _normal(rng, shape, dtype, *, scale=1.0, shift=0.0):
  return jnp.asarray(scale * rng.standard_normal(shape, np.float32) + shift).astype(dtype)


def _problem(seed, shape, dtype, kind, *, residual, shift=0.0):
  """(x, vectors, residual or None, cotangents): fresh normal data, never zeros or ones."""
  rng = np.random.default_rng(seed)
  width = shape[-1]
  x = _normal(rng, shape, dtype, shift=shift)
  vectors = (_normal(rng, (width,), dtype, scale=0.5, shift=1.0),)
  if kind == "layer":
    vectors += (_normal(rng, (width,), dtype, scale=0.5),)
  res = _normal(rng, shape, dtype) if residual else None
  cts = (_normal(rng, shape, dtype), _normal(rng, shape, dtype)) if residual else _normal(
      rng, shape, dtype)
  return x, vectors, res, cts


def _vjp(fn, x, vectors, res, cts, **kwargs):
  """Gradients w.r.t. (x, vectors[, residual]) of fn's outputs against `cts`."""
  if res is None:
    out, pullback = jax.vjp(lambda x, v: fn(x, *v, **kwargs), x, vectors)
  else:
    out, pullback = jax.vjp(lambda x, v, r: fn(x, *v, residual=r, **kwargs), x, vectors, res)
  return pullback(cts)


def _reference_grads(kind, x, vectors, res, cts):
  ref = functools.partial(OPS[kind][1], eps=EPS[kind])
  return testing.float64_reference(lambda x, v, r, c: _vjp(ref, x, v, r, c), x, vectors, res,
                                   cts)


def _check(mode, kind, shape, dtype, *, residual, seed=0, shift=0.0, slack=1.0, **op_kwargs):
  impl, interpret = mode
  x, vectors, res, cts = _problem(seed, shape, dtype, kind, residual=residual, shift=shift)
  got = _vjp(OPS[kind][0], x, vectors, res, cts, eps=EPS[kind], impl=impl, interpret=interpret,
             **op_kwargs)
  want = _reference_grads(kind, x, vectors, res, cts)
  names = ["dx", "dweight", "dbias"][:1 + len(vectors)] + ["dresidual"] * residual
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves) == len(names)
  rows = int(np.prod(shape[:-1]))
  for name, g, w in zip(names, got_leaves, want_leaves):
    assert g.dtype == dtype and g.shape == w.shape, (name, g.dtype, g.shape)
    # dx reduces over the row, dweight/dbias over the rows.
    err = testing.relative_error(g, w)
    tol = slack * testing.tolerance(dtype, max(rows, shape[-1]))
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


# --- Numerics ------------------------------------------------------------------------------

SHAPE = (10, 200)  # two row blocks (the last one partial), 56 padded columns
# Every (kind, residual) pair once, each dtype for both kinds; the other four are slow (fp32
# LayerNorm + residual also runs below, under jit, checkpoint and the multi-program loop).
FAST = {("rms", False, "bf16"), ("rms", True, "f32"), ("layer", False, "f32"),
        ("layer", True, "bf16")}


def _combinations():
  for kind in ("rms", "layer"):
    for residual in (False, True):
      for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        marks = () if (kind, residual, name) in FAST else (pytest.mark.slow,)
        yield pytest.param(kind, residual, dtype, marks=marks,
                           id=f"{kind}-{'residual' if residual else 'plain'}-{name}")


@pytest.mark.parametrize("kind,residual,dtype", list(_combinations()))
def test_grads_match_float64_reference(kernel_mode, kind, residual, dtype):
  _check(kernel_mode, kind, SHAPE, dtype, residual=residual)


@pytest.mark.slow
def test_grads_3d(kernel_mode):
  """x [2, 3, 96]: leading dims flattened into rows."""
  _check(kernel_mode, "layer", (2, 3, 96), jnp.float32, residual=True, seed=1)


def test_programs_loop_over_row_blocks(kernel_mode, monkeypatch):
  """A grid of 3 programs over 4 row blocks of 8 x 256: programs loop 2, 1, 1 times (strided
  blocks), each summing its rows' dweight/dbias before the partials are reduced. Whole rows
  of a power-of-two width in whole blocks: the kernel is built without any mask."""
  monkeypatch.setattr(norm_config, "bwd_programs", lambda row_blocks, target: 3)
  _check(kernel_mode, "layer", (32, 256), jnp.float32, residual=True, seed=2)


def test_layer_norm_grad_mean_far_from_zero(kernel_mode):
  # The backward recomputes two-pass statistics: no cancellation at mean 300.
  _check(kernel_mode, "layer", SHAPE, jnp.float32, residual=False, seed=4, shift=300.0,
         slack=10.0)


@pytest.mark.slow
def test_ragged_rows_in_a_loop(kernel_mode, monkeypatch):
  """7 row blocks over 3 programs, the last block partial and 44 padded columns."""
  monkeypatch.setattr(norm_config, "bwd_programs", lambda row_blocks, target: 3)
  _check(kernel_mode, "rms", (27, 300), jnp.bfloat16, residual=True, seed=5)


@pytest.mark.slow
def test_one_row(kernel_mode):
  _check(kernel_mode, "layer", (1, 33), jnp.float32, residual=False, seed=6)


def test_backward_kernel_runs(kernel_mode):
  """The gradient goes through the Pallas backward kernel, not XLA autodiff."""
  impl, interpret = kernel_mode
  x, (w,), res, cts = _problem(7, (4, 64), jnp.float32, "rms", residual=True)
  grad = jax.grad(lambda x, w, r: jnp.sum(
      rms_norm(x, w, residual=r, impl=impl, interpret=interpret)[0] * cts[0]), argnums=(0, 1, 2))
  jaxpr = str(jax.make_jaxpr(grad)(x, w, res))
  assert "rms_norm_bwd_residual" in jaxpr and "rms_norm_residual" in jaxpr


def test_only_the_norm_output_used(kernel_mode):
  """With a residual, a loss of y alone: dh is a zero cotangent, dx = dresidual still."""
  impl, interpret = kernel_mode
  x, (w,), res, (dy, _) = _problem(8, SHAPE, jnp.float32, "rms", residual=True)
  loss = lambda fn, **kw: lambda x, w, r: jnp.sum(fn(x, w, residual=r, **kw)[0] * dy)
  got = jax.grad(loss(rms_norm, impl=impl, interpret=interpret), argnums=(0, 1, 2))(x, w, res)
  want = testing.float64_reference(
      jax.grad(loss(reference.rms_norm, eps=1e-6), argnums=(0, 1, 2)), x, w, res)
  for g, r in zip(got, want):
    testing.assert_close(g, r, jnp.float32, 200)


WIDE = norm_config.BWD_MAX_BLOCK_WIDTH + 8  # padded to twice BWD_MAX_BLOCK_WIDTH


def test_too_wide_rows_use_the_xla_backward():
  """Padded widths over BWD_MAX_BLOCK_WIDTH: Triton forward, XLA backward."""
  x, (w,), res, cts = _problem(9, (2, WIDE), jnp.float32, "rms", residual=True)
  grad = jax.grad(lambda x: jnp.sum(rms_norm(x, w, residual=res, impl="triton",
                                             interpret=True)[0] * cts[0]))
  jaxpr = str(jax.make_jaxpr(grad)(x))
  assert "rms_norm_residual" in jaxpr and "norm_bwd" not in jaxpr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_too_wide_rows_grads(kind):
  _check(("triton", True), kind, (2, WIDE), jnp.float32, residual=True, seed=9)


def test_empty_rows_grad():
  x, (w,), res, _ = _problem(10, (0, 64), jnp.float32, "rms", residual=True)
  dx, dw, dr = jax.grad(lambda x, w, r: jnp.sum(rms_norm(x, w, residual=r, impl="triton",
                                                         interpret=True)[0]),
                        argnums=(0, 1, 2))(x, w, res)
  assert dx.shape == dr.shape == (0, 64) and dw.shape == (64,)


# --- Transformations: jit, value_and_grad, vmap, checkpoint -----------------------------

def _loss(fn, cts, **kwargs):
  def loss(x, w, b, r):
    y, h = fn(x, w, b, residual=r, **kwargs)
    return jnp.sum(y * cts[0]) + jnp.sum(h * cts[1])
  return loss


def test_value_and_grad_under_jit(kernel_mode):
  impl, interpret = kernel_mode
  x, (w, b), res, cts = _problem(11, SHAPE, jnp.float32, "layer", residual=True)
  loss = _loss(layer_norm, cts, impl=impl, interpret=interpret)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, w, b, res)
  ref_loss = _loss(reference.layer_norm, cts, eps=1e-5)
  want_value, want = testing.float64_reference(
      jax.value_and_grad(ref_loss, argnums=(0, 1, 2, 3)), x, w, b, res)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for g, r in zip(grads, want):
    testing.assert_close(g, r, jnp.float32, 200)


@pytest.mark.parametrize("policy", [
    "nothing_saveable", pytest.param("everything_saveable", marks=pytest.mark.slow)])
def test_grad_under_checkpoint(kernel_mode, policy):
  impl, interpret = kernel_mode
  x, (w, b), res, cts = _problem(12, SHAPE, jnp.float32, "layer", residual=True)
  loss = jax.checkpoint(_loss(layer_norm, cts, impl=impl, interpret=interpret),
                        policy=getattr(jax.checkpoint_policies, policy))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, b, res)
  want = testing.float64_reference(
      jax.grad(_loss(reference.layer_norm, cts, eps=1e-5), argnums=(0, 1, 2, 3)), x, w, b, res)
  for g, r in zip(grads, want):
    testing.assert_close(g, r, jnp.float32, 200)


def _vmap_problem(kernel_mode):
  impl, interpret = kernel_mode
  rng = np.random.default_rng(13)
  arrays = dict(x=_normal(rng, (3, 4, 72), jnp.float32), r=_normal(rng, (3, 4, 72), jnp.float32),
                w=_normal(rng, (72,), jnp.float32, shift=1.0),
                dy=_normal(rng, (3, 4, 72), jnp.float32), dh=_normal(rng, (3, 4, 72), jnp.float32))

  def loss(fn, **kw):
    def f(x, w, r, dy, dh):
      y, h = fn(x, w, residual=r, **kw)
      return jnp.sum(y * dy) + jnp.sum(h * dh)
    return f
  return (arrays, loss(rms_norm, impl=impl, interpret=interpret),
          loss(reference.rms_norm, eps=1e-6))


def test_vmap_of_grad(kernel_mode):
  """Per-example gradients: vmap over x, residual and cotangents, the weight shared."""
  a, ours, ref = _vmap_problem(kernel_mode)
  args = (a["x"], a["w"], a["r"], a["dy"], a["dh"])
  per_example = lambda f: jax.vmap(jax.grad(f, argnums=(0, 1, 2)), in_axes=(0, None, 0, 0, 0))
  want = testing.float64_reference(per_example(ref), *args)
  for g, ref_g in zip(per_example(ours)(*args), want):
    testing.assert_close(g, ref_g, jnp.float32, 72)


@pytest.mark.slow
def test_grad_of_vmap(kernel_mode):
  a, ours, ref = _vmap_problem(kernel_mode)
  args = (a["x"], a["w"], a["r"], a["dy"], a["dh"])

  def batched(fn):
    return lambda *args: jnp.sum(jax.vmap(fn, in_axes=(0, None, 0, 0, 0))(*args))
  got = jax.grad(batched(ours), argnums=(0, 1, 2))(*args)
  want = testing.float64_reference(jax.grad(batched(ref), argnums=(0, 1, 2)), *args)
  for g, ref_g in zip(got, want):
    testing.assert_close(g, ref_g, jnp.float32, 72)


# --- The oracle: references against finite differences in float64 ----------------------

@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_reference_grads_match_finite_differences(kind, residual):
  rng = np.random.default_rng(14)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((3, 17)))
    vectors = tuple(jnp.asarray(rng.standard_normal(17)) for _ in range(1 + (kind == "layer")))
    res = jnp.asarray(rng.standard_normal((3, 17))) if residual else None

    def fn(x, *vectors):
      return OPS[kind][1](x, *vectors, eps=EPS[kind], residual=res)
    # Central differences, eps 1e-4, float64: agreement to ~1e-8 relative.
    check_grads(fn, (x, *vectors), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)
    if residual:
      check_grads(lambda r: OPS[kind][1](x, *vectors, eps=EPS[kind], residual=r), (res,),
                  order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


# --- Configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("width", [100, 576, 768, 4096, 8192])
def test_bwd_heuristic_bounds_registers(width):
  cfg = norm_config.bwd_heuristic(norm_config.device.current_target(), width)
  block = cfg.block_rows * norm_config.next_power_of_2(width)
  # <= 16 elements of each array per thread (8192 fp32 + residual: ~120 registers, no spill).
  assert block // (32 * cfg.num_warps) <= 16, cfg
  assert cfg.num_warps <= norm_config.MAX_WARPS


def test_bwd_programs_cap():
  target = norm_config.device._gpu_target("NVIDIA H100 80GB HBM3", None)
  assert norm_config.bwd_programs(5, target) == 5
  assert norm_config.bwd_programs(10_000, target) == norm_config.BWD_PROGRAMS_PER_SM * 132
  key = norm_config.tuning_key(576, jnp.bfloat16, True, "rms_bwd")
  assert key["kind"] == "rms_bwd"


def test_explicit_bwd_config_reaches_the_backward_kernel(kernel_mode, monkeypatch):
  """`bwd_config=` sets the backward's tile (explicit > tuned table > heuristic): 16 rows of
  64 in tiles of 2 rows are 8 row blocks, where the heuristic's ~2k-element tile takes all 16
  rows in one. The gradients stay right with it (3 programs looping over the 8 blocks)."""
  blocks = []
  monkeypatch.setattr(norm_config, "bwd_programs",
                      lambda row_blocks, target: blocks.append(row_blocks) or 3)
  tile = norm_config.NormConfig(block_rows=2, num_warps=1, num_stages=1)
  _check(kernel_mode, "layer", (16, 64), jnp.float32, residual=True, seed=16, bwd_config=tile)
  assert blocks == [8]
  _check(kernel_mode, "layer", (16, 64), jnp.float32, residual=True, seed=16)
  assert blocks == [8, 1]


def test_bwd_config_type_is_checked():
  x, (w,), _, cts = _problem(17, (4, 64), jnp.float32, "rms", residual=False)
  with pytest.raises(TypeError, match="`bwd_config` expected NormConfig"):
    rms_norm(x, w, impl="xla", bwd_config="2 rows")
  tile = norm_config.NormConfig(1, 1, 1)  # meaningless to XLA: dispatch drops it
  got = jax.grad(lambda x: jnp.sum(rms_norm(x, w, impl="xla", bwd_config=tile) * cts))(x)
  want = jax.grad(lambda x: jnp.sum(rms_norm(x, w, impl="xla") * cts))(x)
  np.testing.assert_array_equal(got, want)


# --- Slow: wider rows, more rows ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("width,dtype", [(4096, jnp.bfloat16), (8192, jnp.float32)])
def test_wide_rows_grad(kernel_mode, kind, width, dtype):
  _check(kernel_mode, kind, (5, width), dtype, residual=True, seed=15)


@pytest.mark.slow
def test_many_rows_grad(kernel_mode):
  _check(kernel_mode, "layer", (600, 576), jnp.bfloat16, residual=True, seed=16)


# --- The audit and benchmark hooks (GRAD_CASES) -------------------------------------------

def test_grad_cases_reach_the_audit_and_lower_with_the_backward_kernel():
  from pallas_kernels.audit import registry, run  # noqa: PLC0415
  from pallas_kernels.audit.targets import TARGETS  # noqa: PLC0415
  cases = [c for c in registry.audit_cases("normalization") if c.case.label.startswith("grad")]
  assert {c.case.label for c in cases} == {c.label for c in specs.GRAD_CASES if c.audit}
  case = next(c for c in cases if c.case.op == "layer_norm" and "residual" in c.case.label)
  kernels = run.lower_case(case, TARGETS["sm90"])
  assert [k.name for k in kernels] == ["layer_norm_residual", "layer_norm_bwd_residual"]


def test_bench_times_grad_cases_as_gradients():
  """`bench.registry` selects GRAD_CASES after CASES and binds them as grad_of(op): here a
  toy-sized case through the public op with impl="xla" and through the xla peer."""
  import types  # noqa: PLC0415

  import pallas_kernels.ops.normalization as package  # noqa: PLC0415
  from pallas_kernels.bench import registry  # noqa: PLC0415
  toy = specs._grad_case("toy", 96, "rms", 1e-5, 8, jnp.float32, True)
  folder = registry.OpFolder("normalization", registry.OPS_DIR, package=package,
                             specs=types.SimpleNamespace(CASES=specs.CASES[:1], GRAD_CASES=[toy]))
  assert [c for _, c in registry.select([folder])] == [specs.CASES[0], toy]
  assert [c for _, c in registry.select([folder], grad=False)] == [specs.CASES[0]]
  rng = np.random.default_rng(17)  # numpy draws: jax.random compiles once per shape
  inputs = tuple(_normal(rng, a.shape, a.dtype) for a in toy.abstract_inputs())
  (dx, dw), kwargs = folder.bound(toy, functools.partial(rms_norm, impl="xla"))(*inputs)
  x, w, res, dy, dh = inputs
  want = testing.float64_reference(
      lambda *a: _vjp(functools.partial(reference.rms_norm, eps=1e-5), a[0], (a[1],), a[2],
                      (a[3], a[4])), x, w, res, dy, dh)
  testing.assert_close(dx, want[0], jnp.float32, 96)
  testing.assert_close(dw, want[1][0], jnp.float32, 96)
  testing.assert_close(kwargs["residual"], want[2], jnp.float32, 96)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm80", "sm90"])
def test_every_grad_audit_case_lowers(target):
  from pallas_kernels.audit import registry, run  # noqa: PLC0415
  from pallas_kernels.audit.targets import TARGETS  # noqa: PLC0415
  for case in registry.audit_cases("normalization"):
    if case.case.label.startswith("grad"):
      names = [k.name for k in run.lower_case(case, TARGETS[target])]
      wide = norm_config.next_power_of_2(case.case.abstract_inputs()[0].shape[-1])
      assert any("bwd" in n for n in names) == (wide <= norm_config.BWD_MAX_BLOCK_WIDTH), names
