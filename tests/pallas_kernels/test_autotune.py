"""The autotuner without a GPU: refusal, candidate enumeration, winner selection and table
writing, with a toy op and an injected timer."""

import dataclasses
import json
import types

import jax
import pytest

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device
from pallas_kernels._core.specs import Case
from pallas_kernels.autotune import __main__ as autotune_main
from pallas_kernels.autotune import adapters, candidates, tuner
from pallas_kernels.bench import registry, runner, timing
from tests.conftest import HAS_GPU

TOY_GPU = device.Target("gpu", "Toy GPU 80GB", (9, 0), 227 * 1024, 132)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  block: int
  num_warps: int = 4
  fused: bool = False

  def __post_init__(self):
    if self.block > 256:
      raise ValueError("ToyConfig: `block` expected <= 256")


def _toy(x, *, scale, impl=None, config=None):
  """Right for every config but block=64, which is wrong (and, per the fake timer, fastest);
  block=128 is refused while tracing, block=256 'fails to compile' at run time."""
  block = config.block if config is not None else 32
  if block == 128:
    raise ValueError("toy: block 128 does not divide the row")
  if block == 256:
    return jax.pure_callback(lambda: (_ for _ in ()).throw(RuntimeError("no compile")),
                             jax.ShapeDtypeStruct(x.shape, x.dtype))
  return x * scale + (block == 64)


HOOKS = ("autotune_key", "autotune_default", "candidates")


def _toy_folder(tmp_path, hooks=HOOKS):
  cases = [Case("toy", f"toy n={n}", lambda key, n=n: (jax.random.normal(key, (n,)),),
                kwargs={"scale": 2.0}, flops=n, bytes_moved=8 * n) for n in (64, 128, 512)]
  config = types.SimpleNamespace(__name__=__name__, ToyConfig=ToyConfig)  # as if defined there
  hook_fns = {
      "autotune_key": lambda op, x, *, scale: {"op": op, "n": 64 if x.shape[0] <= 128 else 512},
      "autotune_default": lambda target, x, *, scale: ToyConfig(32),
      "candidates": lambda target, x, *, scale: [ToyConfig(b, 8) for b in (16, 32, 64, 128, 256)],
  }
  for name in hooks:
    setattr(config, name, hook_fns[name])
  return registry.OpFolder("toy", tmp_path, package=types.SimpleNamespace(toy=_toy),
                           specs=types.SimpleNamespace(CASES=cases), config=config)


COST_MS = {16: 3.0, 32: 2.0, 64: 0.1, 128: 0.1, 256: 0.1}


def fake_timer(fn, input_sets, what):
  cfg = what["config"]
  ms = 5.0 if cfg is None else COST_MS[cfg.block] * (1.0 if cfg.num_warps == 8 else 1.2)
  return timing.Timing(ms, ms, ms, ms, 1, "fake")


@pytest.mark.skipif(HAS_GPU, reason="the refusal is for machines without a GPU")
def test_refuses_to_tune_without_gpu(capsys):
  assert autotune_main.main(["--op", "rms_norm"]) == 2
  assert "a GPU is required" in capsys.readouterr().err


def test_help_and_list_exit_zero(capsys):
  with pytest.raises(SystemExit) as exit_info:
    autotune_main.main(["--help"])
  assert exit_info.value.code == 0
  assert autotune_main.main(["--list", "--quick"]) == 0
  out = capsys.readouterr().out
  assert "NOT TUNABLE" not in out, out


def test_every_op_has_an_adapter_and_keys():
  """Contract drift shows here: every public op of every folder maps its cases to keys."""
  for folder in registry.load():
    for op in folder.public_ops:
      adapter = adapters.adapter_for(folder, op)
      groups = tuner.group_by_key(adapter, registry.quick_subset(folder.cases), cases_per_key=1)
      assert groups and all(isinstance(key, dict) for key, _ in groups), (folder.name, op)
      args, kwargs = folder.bind(groups[0][1][0], groups[0][1][0].abstract_inputs())
      configs = candidates.enumerate_configs(adapter, autotune_main.ASSUMED_TARGET, args, kwargs)
      assert configs and all(isinstance(c, adapter.config_cls) for c in configs)


def test_generic_grid_walks_out_from_the_default():
  grid = candidates.generic_grid(ToyConfig, ToyConfig(64, 4), limit=200)
  assert grid[0] == ToyConfig(64, 4)
  assert set(grid[1:6]) == {ToyConfig(32, 4), ToyConfig(128, 4), ToyConfig(64, 2),
                            ToyConfig(64, 8), ToyConfig(64, 4, True)}  # one step away
  assert len(grid) == len(set(grid)) == 5 * 5 * 2  # block 16..256, warps 1..16, fused both
  assert all(c.block <= 256 for c in grid)
  assert len(candidates.generic_grid(ToyConfig, ToyConfig(64), limit=7)) == 7
  # No default config: the field defaults (and the middle of the usual values) are the centre.
  assert candidates.generic_grid(ToyConfig, None, limit=1) == [ToyConfig(64, 4, False)]


def test_enumerate_puts_the_default_first_and_dedupes(tmp_path):
  adapter = adapters.adapter_for(_toy_folder(tmp_path), "toy")
  x = jax.ShapeDtypeStruct((64,), "float32")
  configs = candidates.enumerate_configs(adapter, TOY_GPU, (x,), {"scale": 2.0}, limit=3)
  assert configs == [ToyConfig(32), ToyConfig(16, 8), ToyConfig(32, 8)]
  generic = adapters.adapter_for(_toy_folder(tmp_path, hooks=("autotune_key",)), "toy")
  assert generic.candidates is None and generic.default is None
  assert candidates.enumerate_configs(generic, TOY_GPU, (x,), {"scale": 2.0}, limit=2) == [
      ToyConfig(64, 4), ToyConfig(32, 4)]  # the generic grid around the field defaults
  with pytest.raises(adapters.NotTunable, match="autotune_key"):
    adapters.adapter_for(_toy_folder(tmp_path, hooks=()), "toy")


def test_tune_picks_the_fastest_correct_config_and_writes_the_table(tmp_path):
  folder = _toy_folder(tmp_path)
  adapter = adapters.adapter_for(folder, "toy")
  groups = tuner.group_by_key(adapter, folder.cases, cases_per_key=2)
  assert [(key["n"], [c.label for c in cases]) for key, cases in groups] == [
      (64, ["toy n=64", "toy n=128"]), (512, ["toy n=512"])]
  key, cases = groups[0]
  first = tuner.tune_key(adapter, key, cases, TOY_GPU, fake_timer, limit=20, rotate_bytes=0,
                         log=lambda _: None)
  status = {t.config: t.status for t in first.trials}
  assert list(status)[0] == ToyConfig(32)             # the default, tried first
  assert status[ToyConfig(64, 8)] == runner.WRONG     # fastest, but wrong
  assert status[ToyConfig(128, 8)] == runner.REFUSED  # raised while tracing
  assert status[ToyConfig(256, 8)] == runner.ERROR    # failed at run time
  assert first.winner.config == ToyConfig(32, 8)
  assert first.winner.score_ms == pytest.approx(2.0)
  assert first.current.score_ms == pytest.approx(5.0)  # config=None, recorded beside it
  results = [first]

  # An entry for another key survives; the re-tuned key is replaced.
  path = config_lib.tuned_path(tmp_path, TOY_GPU.device_kind)
  stale = {"key": {"op": "toy", "n": 64}, "config": {"block": 16, "num_warps": 4, "fused": False}}
  other = {"key": {"op": "toy", "n": 4096}, "config": {"block": 16, "num_warps": 4, "fused": False}}
  config_lib.write_table(tmp_path, "toy", TOY_GPU.device_kind, jax.__version__, [stale, other])
  assert tuner.write_winners(tmp_path, "toy", TOY_GPU.device_kind, results) == path
  table = json.loads(path.read_text())
  assert table["version"] == config_lib.TABLE_VERSION and table["device_kind"] == "Toy GPU 80GB"
  assert len(table["entries"]) == 2  # the stale entry replaced, the other kept
  assert config_lib.lookup(tmp_path, {"op": "toy", "n": 64}, TOY_GPU) == dataclasses.asdict(
      ToyConfig(32, 8))
  assert config_lib.lookup(tmp_path, {"op": "toy", "n": 4096}, TOY_GPU) == other["config"]
  entry = next(e for e in table["entries"] if e["key"] == {"op": "toy", "n": 64})
  assert entry["cases"] == ["toy n=64", "toy n=128"] and entry["current_ms"] == pytest.approx(5.0)


def test_spread_picks_smallest_and_largest():
  cases = [Case("t", str(i), lambda key: (), flops=float(i)) for i in (5, 1, 9, 3, 7)]
  assert [c.label for c in tuner.spread(cases, 2)] == ["1", "9"]
  assert [c.label for c in tuner.spread(cases, 3)] == ["1", "5", "9"]
  assert [c.label for c in tuner.spread(cases, 1)] == ["9"]


def test_gpu_run_end_to_end_with_a_toy_op(tmp_path, monkeypatch, capsys):
  """The GPU path of the CLI on a toy op: a fake timer, a fake GPU target."""
  folder = _toy_folder(tmp_path)
  fake_timer.name = "fake"
  monkeypatch.setattr(autotune_main, "on_gpu", lambda: True)
  monkeypatch.setattr(registry, "load", lambda: [folder])
  monkeypatch.setattr(device, "current_target", lambda: TOY_GPU)
  monkeypatch.setattr(timing, "make_timer", lambda *args, **kwargs: fake_timer)
  argv = ["--op", "toy", "--out", str(tmp_path / "logs"), "--cases-per-key", "1",
          "--max-candidates", "3"]
  assert autotune_main.main(argv) == 0
  table = json.loads(config_lib.tuned_path(tmp_path, TOY_GPU.device_kind).read_text())
  assert [e["config"]["block"] for e in table["entries"]] == [32, 32]
  log = json.loads((tmp_path / "logs" / "autotune-toy-toy.json").read_text())
  assert [k["key"]["n"] for k in log["keys"]] == [64, 512]
  assert "winner ToyConfig(block=32, num_warps=8, fused=False)" in capsys.readouterr().out
