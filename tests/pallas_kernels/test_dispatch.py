import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import testing
from pallas_kernels._core import config, dispatch, device


def _candidates(calls):
  def xla(x):
    calls.append("xla")
    return x

  def triton(x, *, interpret):
    calls.append(("triton", interpret))
    return x

  def refuse_odd(x):
    return "odd length" if x.shape[0] % 2 else None

  return [dispatch.Implementation("triton", triton, refuses=refuse_odd),
          dispatch.Implementation("xla", xla, is_pallas=False)]


def test_default_on_cpu_is_xla():
  calls = []
  dispatch.call("op", None, False, _candidates(calls), jnp.ones(4))
  assert calls == ["xla"]


def test_interpret_prefers_pallas_and_falls_back_when_refused():
  calls = []
  dispatch.call("op", None, True, _candidates(calls), jnp.ones(4))
  dispatch.call("op", None, True, _candidates(calls), jnp.ones(3))
  assert calls == [("triton", True), "xla"]


def test_explicit_impl_errors_say_why():
  with pytest.raises(ValueError, match="impl='triton' needs an NVIDIA GPU.*interpret=True"):
    dispatch.call("op", "triton", False, _candidates([]), jnp.ones(4))
  with pytest.raises(ValueError, match="op: odd length"):
    dispatch.call("op", "triton", True, _candidates([]), jnp.ones(3))
  with pytest.raises(ValueError, match=r"`impl` expected one of .*got 'cuda'"):
    dispatch.call("op", "cuda", False, _candidates([]), jnp.ones(4))
  with pytest.raises(ValueError, match="impl='mosaic' is not implemented.*available"):
    dispatch.call("op", "mosaic", True, _candidates([]), jnp.ones(4))
  with pytest.raises(TypeError, match="`interpret` expected a bool"):
    dispatch.call("op", None, "yes", _candidates([]), jnp.ones(4))


def _abstract_mesh(kind):
  return testing.abstract_gpu(kind)


def test_target_follows_abstract_device():
  with _abstract_mesh("NVIDIA A100-SXM4-80GB"):
    t = device.current_target()
    assert t.is_gpu and t.compute_capability == (8, 0) and not t.is_hopper
  with _abstract_mesh("NVIDIA H100 80GB HBM3"):
    assert device.current_target().is_hopper
  assert not device.current_target().is_gpu


def test_config_resolution_order(tmp_path):
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Cfg:
    block: int

  key = {"n": 128}
  heuristic = lambda target: Cfg(block=16 if target.is_hopper else 8)
  assert config.resolve(Cfg, Cfg(4), tmp_path, key, heuristic) == Cfg(4)
  with _abstract_mesh("NVIDIA H100 80GB HBM3"):
    assert config.resolve(Cfg, None, tmp_path, key, heuristic) == Cfg(16)
    config.write_table(tmp_path, "op", "NVIDIA H100 80GB HBM3", jax.__version__,
                       [{"key": key, "config": {"block": 64}}])
    assert config.resolve(Cfg, None, tmp_path, key, heuristic) == Cfg(64)
    assert config.resolve(Cfg, None, tmp_path, {"n": 256}, heuristic) == Cfg(16)
  with _abstract_mesh("NVIDIA A100-SXM4-80GB"):
    assert config.resolve(Cfg, None, tmp_path, key, heuristic) == Cfg(8)
  with pytest.raises(TypeError, match="`config` expected Cfg"):
    config.resolve(Cfg, {"block": 4}, tmp_path, key, heuristic)


def test_xla_impl_never_sees_kernel_configs():
  seen = {}

  def xla(x, **kwargs):
    seen.update(kwargs)
    return x

  candidates = [dispatch.Implementation("xla", xla, is_pallas=False)]
  dispatch.call("op", "xla", False, candidates, jnp.ones(2), config=object(), bwd_config=object(),
                eps=1e-6)
  assert seen == {"eps": 1e-6}
