"""Shared test helpers: float64 references, one tolerance table, random inputs, error norms.

Every kernel test compares ‖out − ref‖ / ‖ref‖ against a float64 evaluation of
the plain-JAX reference on the same (already rounded) inputs. NaN never passes.
Interpret mode fills outputs with NaN before the kernel runs (ints with the
dtype's minimum), so an element the kernel forgot to write fails the check;
`tests/pallas_kernels/test_poison.py` proves that premise.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from pallas_kernels._core import device

# Relative Frobenius-norm error allowed per output dtype, before scaling by reduction length.
BASE_TOLERANCE = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 1e-2,
    jnp.dtype(jnp.float16): 1e-2,
}


def tolerance(dtype, reduction_len: int = 1) -> float:
  """Allowed relative error; fp32 accumulation error grows like sqrt(reduction length)."""
  base = BASE_TOLERANCE[jnp.dtype(dtype)]
  if jnp.dtype(dtype) == jnp.float32:
    return base * max(1.0, math.sqrt(reduction_len / 1024))
  return base


def relative_error(out, ref) -> float:
  """‖out − ref‖ / ‖ref‖ in float64; NaN or inf anywhere gives inf."""
  out = np.asarray(jnp.asarray(out, jnp.float32), dtype=np.float64)
  ref = np.asarray(ref, dtype=np.float64)
  if out.shape != ref.shape:
    raise AssertionError(f"shape mismatch: out {out.shape} vs ref {ref.shape}")
  if not np.all(np.isfinite(out)):
    return math.inf
  denom = np.linalg.norm(ref)
  if denom == 0:
    return float(np.linalg.norm(out))
  return float(np.linalg.norm(out - ref) / denom)


def assert_close(out, ref, dtype, reduction_len: int = 1, what: str = "output") -> None:
  err = relative_error(out, ref)
  tol = tolerance(dtype, reduction_len)
  if not err <= tol:
    n_nan = int(np.sum(~np.isfinite(np.asarray(jnp.asarray(out, jnp.float32)))))
    raise AssertionError(f"{what}: relative error {err:.3e} > tolerance {tol:.1e} "
                         f"(dtype {jnp.dtype(dtype).name}, non-finite elements: {n_nan})")


def float64_reference(fn, *args, **kwargs):
  """Evaluate `fn` with every floating array argument promoted to float64."""
  def promote(x):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)
    return x
  with jax.enable_x64(True):
    args = jax.tree.map(promote, args)
    kwargs = jax.tree.map(promote, kwargs)
    out = fn(*args, **kwargs)
    return jax.tree.map(lambda y: np.asarray(y, dtype=np.float64), out)


def random_normal(key, shape, dtype, scale: float = 1.0):
  """Fresh standard-normal data (never zeros), rounded to `dtype`.

  Drawn with numpy from the key's bits: `jax.random` compiles once per new shape (about a
  second of CPU each), which dominated small interpret-mode tests.
  """
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def keys(seed: int, n: int):
  return list(jax.random.split(jax.random.key(seed), n))


# ---- configs for a GPU that is not here.

GPU_KINDS = ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3")


@contextlib.contextmanager
def abstract_gpu(kind: str, num_cores: int = 8):
  """Within it `device.current_target()` is a `kind` GPU (an abstract mesh, as the offline audit
  uses), so heuristics and tuned tables resolve as on that card; yields that target."""
  ad = jax.sharding.AbstractDevice(device_kind=kind, num_cores=num_cores, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=ad)):
    yield device.current_target()


def assert_heuristic_fits(config_module, target: device.Target, *, max_registers: int,
                          head_dims=(64, 80, 96, 128, 256),
                          dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)) -> None:
  """For every head_dim and dtype, `config_module.heuristic(target, ...)` fits the target's
  shared memory (`config_module.shared_memory_bytes`) and its fp32 accumulators take at most
  `max_registers` registers a thread (`config_module.accumulator_registers`)."""
  for head_dim in head_dims:
    for dtype in dtypes:
      cfg = config_module.heuristic(target, head_dim=head_dim, dtype=dtype)
      where = (target.device_kind, head_dim, jnp.dtype(dtype).name, cfg)
      assert config_module.shared_memory_bytes(cfg, head_dim, dtype) <= \
          target.max_shared_memory_bytes, where
      assert config_module.accumulator_registers(cfg, head_dim) <= max_registers, where


def kernel_names(closed_jaxpr) -> list[str]:
  """Names of the Pallas kernels in a jaxpr, nested jaxprs (remat, custom_vjp, jit) included:
  Triton `pallas_call`s and Mosaic GPU kernels (`plgpu.kernel` binds `mpmd_map` in jax 0.11)."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("pallas_call", "mpmd_map"):
        names.append(str(eqn.params["name"]))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jex.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex.core.Jaxpr):
            walk(sub)
  walk(closed_jaxpr.jaxpr)
  return names
