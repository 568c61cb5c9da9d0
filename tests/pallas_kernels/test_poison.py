"""The premise of every kernel test: interpret mode poisons outputs, and NaN never passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import testing


def _writes_first_half(x_ref, o_ref):
  o_ref[:4] = x_ref[:4]


def test_unwritten_elements_are_nan_in_interpret_mode():
  x = jnp.arange(8, dtype=jnp.float32) + 1
  out = pl.pallas_call(_writes_first_half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                       interpret=True)(x)
  assert np.all(np.isnan(np.asarray(out[4:])))
  with pytest.raises(AssertionError, match="non-finite elements: 4"):
    testing.assert_close(out, np.asarray(x, np.float64), jnp.float32)


def test_tolerance_rejects_nan_and_real_errors():
  ref = np.ones(16)
  assert testing.relative_error(np.full(16, np.nan, np.float32), ref) == np.inf
  testing.assert_close(jnp.ones(16, jnp.bfloat16), ref, jnp.bfloat16)
  with pytest.raises(AssertionError):
    testing.assert_close(jnp.ones(16) * 1.001, ref, jnp.float32)


def test_float64_reference_is_float64():
  out = testing.float64_reference(lambda a: a * 3, jnp.ones(3, jnp.bfloat16))
  assert out.dtype == np.float64
