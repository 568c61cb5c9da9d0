"""Gradients of matmul (bias / activation / residual epilogue) and gated_matmul through the
custom_vjp and the Pallas backward kernels, against float64 autodiff of the references, on
random inputs and random cotangents; the references against central finite differences.

Shapes are ragged (M, N, K multiples of nothing) so every masked edge of the forward, dx and
dw kernels runs, including the transposed-operand tiles.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.test_util import check_grads

from pallas_kernels import testing
from pallas_kernels.ops.matmul import MatmulConfig, gated_matmul, matmul, reference, specs
from tests.pallas_kernels.test_matmul import _inputs as forward_inputs

M, K, N = 37, 70, 50


def _inputs(seed, lead, k, n, dtype, *, bias=False, residual=False, gated=False,
            out_dtype=None):
  """The forward tests' inputs (x, w and the optional bias / residual / w_up), plus a random
  cotangent of the output (never zeros or ones)."""
  out = forward_inputs(seed, lead, k, n, dtype, bias=bias, residual=residual, gated=gated)
  out["ct"] = testing.random_normal(testing.keys(seed, 6)[5], (*lead, n), out_dtype or dtype)
  return out


DIFF_ARGS = ("x", "w", "w_up", "bias", "residual")


def _grads(fn, a, **kwargs):
  """{name: gradient} of fn's output against a["ct"], w.r.t. every array argument present."""
  names = [n for n in DIFF_ARGS if n in a]

  def call(*arrays):
    args = dict(zip(names, arrays))
    if "w_up" in args:
      return fn(args["x"], args["w"], args["w_up"], **kwargs)
    return fn(args["x"], args["w"], bias=args.get("bias"), residual=args.get("residual"),
              **kwargs)
  _, pullback = jax.vjp(call, *(a[n] for n in names))
  return dict(zip(names, pullback(a["ct"])))


def _reference_grads(a, **kwargs):
  fn = reference.gated_matmul if "w_up" in a else reference.matmul
  return testing.float64_reference(lambda a: _grads(fn, a, **kwargs), a)


def _check(mode, a, **kwargs):
  impl, interpret = mode
  fn = gated_matmul if "w_up" in a else matmul
  got = _grads(fn, a, impl=impl, interpret=interpret, **kwargs)
  # The float64 oracle keeps float64 outputs (no out_dtype) and has no tuning knobs.
  want = _reference_grads(a, **{k: v for k, v in kwargs.items()
                                if k not in ("config", "out_dtype")})
  dtype = a["x"].dtype
  reduction = max(a["x"].size // a["x"].shape[-1], *a["w"].shape)  # M for dw, N for dx, K
  for name, g in got.items():
    assert g.dtype == a[name].dtype and g.shape == a[name].shape, name
    err = testing.relative_error(g, want[name])
    tol = testing.tolerance(dtype, reduction)
    assert err <= tol, f"d{name}: relative error {err:.3e} > {tol:.1e}"


# ---- numerics ----------------------------------------------------------------------------

# Each activation with a different (bias, residual) pair, so the four combinations all run.
EPILOGUES = [(None, True, True), ("silu", False, False), ("gelu", True, False),
             ("gelu_tanh", False, True), ("relu", True, True)]


@pytest.mark.parametrize("activation,bias,residual", EPILOGUES)
def test_matmul_grads_fp32(kernel_mode, activation, bias, residual):
  a = _inputs(1, (M,), K, N, jnp.float32, bias=bias, residual=residual)
  _check(kernel_mode, a, activation=activation)


@pytest.mark.parametrize("activation,bias,residual", [
    (None, True, True),
    pytest.param("gelu_tanh", True, False, marks=pytest.mark.slow),
    pytest.param("silu", False, True, marks=pytest.mark.slow),
    pytest.param("gelu", True, True, marks=pytest.mark.slow),
    pytest.param("relu", False, False, marks=pytest.mark.slow)])
def test_matmul_grads_bf16(kernel_mode, activation, bias, residual):
  a = _inputs(2, (M,), K, N, jnp.bfloat16, bias=bias, residual=residual)
  _check(kernel_mode, a, activation=activation)


@pytest.mark.parametrize("activation,dtype", [
    ("silu", jnp.bfloat16), ("gelu_tanh", jnp.float32),
    pytest.param("gelu", jnp.float32, marks=pytest.mark.slow),
    pytest.param("silu", jnp.float16, marks=pytest.mark.slow)])
def test_gated_grads(kernel_mode, activation, dtype):
  """x [3, 7, K]: leading dims flattened into M for the forward, dx and dw."""
  _check(kernel_mode, _inputs(3, (3, 7), 45, 36, dtype, gated=True), activation=activation)


def test_out_dtype_grads(kernel_mode):
  """bf16 operands, fp32 output: the fp32 cotangent meets a bf16 dz, dx, dw."""
  a = _inputs(4, (M,), K, N, jnp.bfloat16, bias=True, residual=True, out_dtype=jnp.float32)
  _check(kernel_mode, a, activation="silu", out_dtype=jnp.float32)


@pytest.mark.slow
def test_grads_with_explicit_forward_config(kernel_mode):
  """x [2, 5, K] with a forward config of 16x16x16 tiles (a grid of several tiles); the
  backward kernels resolve their own configs."""
  a = _inputs(5, (2, 5), 40, 24, jnp.float32, bias=True, residual=True)
  _check(kernel_mode, a, activation="gelu_tanh", config=MatmulConfig(16, 16, 16, group_m=2))


def _ops_outside_kernels(closed_jaxpr) -> tuple[list[str], list[str]]:
  """(primitive names outside Pallas kernels, Pallas kernel names) of a jaxpr, recursively."""
  prims, kernels = [], []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        kernels.append(str(eqn.params["name"]))
        continue
      prims.append(eqn.primitive.name)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(closed_jaxpr.jaxpr)
  return prims, kernels


def test_backward_runs_the_kernels_without_transposes(kernel_mode):
  """dx and dw are Pallas launches that read w and x in place: no transpose of either."""
  impl, interpret = kernel_mode
  a = _inputs(6, (M,), K, N, jnp.float32, bias=True)
  loss = lambda x, w, b: jnp.sum(matmul(x, w, bias=b, activation="silu", impl=impl,
                                        interpret=interpret) * a["ct"])
  prims, kernels = _ops_outside_kernels(
      jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(a["x"], a["w"], a["bias"]))
  assert sorted(kernels) == ["matmul_dw", "matmul_dx", "matmul_preact"]
  assert "transpose" not in prims and "dot_general" not in prims
  g = _inputs(7, (M,), K, N, jnp.float32, gated=True)
  gated_loss = lambda x, w, u: jnp.sum(gated_matmul(x, w, u, impl=impl,
                                                    interpret=interpret) * g["ct"])
  prims, kernels = _ops_outside_kernels(
      jax.make_jaxpr(jax.grad(gated_loss, argnums=(0, 1, 2)))(g["x"], g["w"], g["w_up"]))
  assert sorted(kernels) == ["gated_matmul_dw", "gated_matmul_dx", "gated_matmul_preact"]
  assert "transpose" not in prims and "dot_general" not in prims


def test_empty_rows_grad():
  a = _inputs(8, (0,), 16, 8, jnp.float32, bias=True)
  got = _grads(matmul, a, activation="silu", impl="triton", interpret=True)
  assert got["x"].shape == (0, 16)
  np.testing.assert_array_equal(got["w"], 0)
  np.testing.assert_array_equal(got["bias"], 0)


# ---- transformations: jit, value_and_grad, checkpoint, vmap -------------------------------

def _loss(fn, ct, **kwargs):
  return lambda x, w, b, r: jnp.sum(fn(x, w, bias=b, residual=r, **kwargs) * ct)


def test_value_and_grad_under_jit(kernel_mode):
  impl, interpret = kernel_mode
  a = _inputs(9, (M,), K, N, jnp.float32, bias=True, residual=True)
  args = (a["x"], a["w"], a["bias"], a["residual"])
  ours = _loss(matmul, a["ct"], activation="gelu", impl=impl, interpret=interpret)
  value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(*args)
  want_value, want = testing.float64_reference(
      jax.value_and_grad(_loss(reference.matmul, a["ct"], activation="gelu"),
                         argnums=(0, 1, 2, 3)), *args)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for g, r in zip(grads, want):
    testing.assert_close(g, r, jnp.float32, K)


@pytest.mark.parametrize("policy", [
    "nothing_saveable", pytest.param("dots_with_no_batch_dims_saveable",
                                     marks=pytest.mark.slow)])
def test_grad_under_checkpoint(kernel_mode, policy):
  impl, interpret = kernel_mode
  g = _inputs(10, (M,), K, N, jnp.float32, gated=True)

  def loss(fn, **kw):
    return lambda x, w, u: jnp.sum(fn(x, w, u, activation="silu", **kw) * g["ct"])
  ours = jax.checkpoint(loss(gated_matmul, impl=impl, interpret=interpret),
                        policy=getattr(jax.checkpoint_policies, policy))
  got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(g["x"], g["w"], g["w_up"])
  want = testing.float64_reference(jax.grad(loss(reference.gated_matmul), argnums=(0, 1, 2)),
                                   g["x"], g["w"], g["w_up"])
  for got_g, r in zip(got, want):
    testing.assert_close(got_g, r, jnp.float32, K)


def _launch_grids(jaxpr: str) -> dict[str, str]:
  """{kernel name: grid} of every pallas_call in a printed jaxpr."""
  out = {}
  for call in jaxpr.split("pallas_call[")[1:]:
    out[re.search(r"\bname=(\w+)", call).group(1)] = re.search(r"grid=\(([^)]*)\)", call).group(1)
  return out


def test_vmap_of_grad_folds_rows(kernel_mode):
  """Per-example gradients (weights shared): correct, and the forward and dx launches fold
  the vmapped axis into their rows (one launch, weights streamed once)."""
  impl, interpret = kernel_mode
  a = _inputs(11, (3, 12), K, N, jnp.float32, residual=True)
  cts = a["ct"]

  def loss(fn, **kw):
    return lambda x, w, r, ct: jnp.sum(fn(x, w, residual=r, activation="relu", **kw) * ct)
  per_example = lambda f: jax.vmap(jax.grad(f, argnums=(0, 1, 2)), in_axes=(0, None, 0, 0))
  ours = per_example(loss(matmul, impl=impl, interpret=interpret))
  args = (a["x"], a["w"], a["residual"], cts)
  want = testing.float64_reference(per_example(loss(reference.matmul)), *args)
  for g, r in zip(ours(*args), want):
    testing.assert_close(g, r, jnp.float32, K)
  grids = _launch_grids(str(jax.make_jaxpr(ours)(*args)))
  # 36 rows in 1-D grids: the batch axis folded into M. dw keeps Pallas's batch grid axis
  # (per-example weight gradients are what vmap of grad asks for).
  assert grids["matmul_preact"].count(",") == grids["matmul_dx"].count(",") == 1, grids
  assert grids["matmul_dw"].startswith("3,"), grids


@pytest.mark.slow
def test_grad_of_vmap(kernel_mode):
  impl, interpret = kernel_mode
  a = _inputs(12, (3, 12), K, N, jnp.bfloat16, bias=True)

  def loss(fn, **kw):
    return lambda x, w, b, ct: jnp.sum(
        jax.vmap(lambda x, ct: fn(x, w, bias=b, activation="gelu_tanh", **kw) * ct)(x, ct))
  args = (a["x"], a["w"], a["bias"], a["ct"])
  got = jax.grad(loss(matmul, impl=impl, interpret=interpret), argnums=(0, 1, 2))(*args)
  want = testing.float64_reference(jax.grad(loss(reference.matmul), argnums=(0, 1, 2)), *args)
  for g, r in zip(got, want):
    testing.assert_close(g, r, jnp.bfloat16, K)


# ---- the oracle: references against finite differences in float64 -----------------------

@pytest.mark.parametrize("activation,bias,residual", EPILOGUES)
def test_reference_matmul_grads_match_finite_differences(activation, bias, residual):
  rng = np.random.default_rng(13)
  with jax.enable_x64(True):
    x, w = jnp.asarray(rng.standard_normal((4, 6))), jnp.asarray(rng.standard_normal((6, 5)))
    b = jnp.asarray(rng.standard_normal(5)) if bias else None
    r = jnp.asarray(rng.standard_normal((4, 5))) if residual else None
    fn = lambda x, w, b, r: reference.matmul(x, w, bias=b, residual=r, activation=activation)
    args = (x, w, b, r)
    check_grads(fn, args, order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_reference_gated_grads_match_finite_differences(activation):
  rng = np.random.default_rng(14)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((4, 6)))
    w, u = jnp.asarray(rng.standard_normal((6, 5))), jnp.asarray(rng.standard_normal((6, 5)))
    check_grads(functools.partial(reference.gated_matmul, activation=activation), (x, w, u),
                order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


# ---- the audit hook (GRAD_CASES) ----------------------------------------------------------

def _grad_audit_cases():
  from pallas_kernels.audit import registry  # noqa: PLC0415
  return [c for c in registry.audit_cases("matmul") if c.case.label.startswith("grad")]


def test_grad_cases_reach_the_audit():
  assert {c.case.label for c in _grad_audit_cases()} == {c.label for c in specs.GRAD_CASES
                                                        if c.audit}
  for case in specs.GRAD_CASES:
    assert case.array_kwargs[-1] == "cotangent" and case.flops > 0 and case.bytes_moved > 0


@pytest.mark.parametrize("target", [pytest.param("sm80", marks=pytest.mark.slow), "sm90"])
def test_every_grad_audit_case_lowers(target):
  """jax.grad of each audit case lowers for CUDA: forward, dx and dw Triton kernels."""
  from pallas_kernels.audit import run  # noqa: PLC0415
  from pallas_kernels.audit.targets import TARGETS  # noqa: PLC0415
  for case in _grad_audit_cases():
    names = [k.name for k in run.lower_case(case, TARGETS[target])]
    prefix = "gated_matmul" if case.case.op == "gated_matmul" else "matmul"
    assert f"{prefix}_dx" in names and f"{prefix}_dw" in names, (case.case.label, names)
