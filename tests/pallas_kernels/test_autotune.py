"""The autotuner without a GPU: refusal, candidate enumeration, winner selection and table
writing, with a toy op and an injected timer."""

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._core import config as config_lib
from pallas_kernels._core import device
from pallas_kernels._core.specs import Case
from pallas_kernels.autotune import __main__ as autotune_main
from pallas_kernels.autotune import adapters, candidates, tuner
from pallas_kernels.bench import registry, runner, timing
from pallas_kernels.ops.attention import api as attention_api
from pallas_kernels.ops.attention import config as attention_config
from pallas_kernels.ops.attention import config_bwd
from pallas_kernels.ops.normalization import config as norm_config
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


def _toy(x, *, scale, impl=None, config=None, bwd_config=None):
  """Right for every config but block=64, which is wrong (and, per the fake timer, fastest);
  block=128 is refused while tracing, block=256 'fails to compile' at run time. A
  `bwd_config` (tuned from the grad cases) stands in for a backward's: block=64 gets the
  gradient wrong, every other block is right."""
  if bwd_config is not None:
    assert config is None, "a backward candidate must not set the forward's config"
    return x * (scale + (bwd_config.block == 64))
  block = config.block if config is not None else 32
  if block == 128:
    raise ValueError("toy: block 128 does not divide the row")
  if block == 256:
    return jax.pure_callback(lambda: (_ for _ in ()).throw(RuntimeError("no compile")),
                             jax.ShapeDtypeStruct(x.shape, x.dtype))
  return x * scale + (block == 64)


HOOKS = ("autotune_key", "autotune_default", "candidates")
BWD_HOOKS = ("autotune_bwd_key", "autotune_bwd_default", "bwd_candidates")


def _toy_grad_inputs(key, n):
  return jax.random.normal(key, (n,)), jax.random.normal(jax.random.fold_in(key, 1), (n,))


def _toy_folder(tmp_path, hooks=HOOKS, grad=False):
  """The toy op's folder; with `grad`, GRAD_CASES and the backward hooks too (the backward
  config class is config.py's ToyConfig, as normalization's is its NormConfig)."""
  cases = [Case("toy", f"toy n={n}", lambda key, n=n: (jax.random.normal(key, (n,)),),
                kwargs={"scale": 2.0}, flops=n, bytes_moved=8 * n) for n in (64, 128, 512)]
  grad_cases = [Case("toy", f"grad toy n={n}", functools.partial(_toy_grad_inputs, n=n),
                     kwargs={"scale": 2.0}, flops=n, bytes_moved=8 * n,
                     array_kwargs=("cotangent",)) for n in (64, 512)] if grad else []
  config = types.SimpleNamespace(__name__=__name__, ToyConfig=ToyConfig)  # as if defined there
  hook_fns = {
      "autotune_key": lambda op, x, *, scale: {"op": op, "n": 64 if x.shape[0] <= 128 else 512},
      "autotune_default": lambda target, x, *, scale: ToyConfig(32),
      "candidates": lambda target, x, *, scale: [ToyConfig(b, 8) for b in (16, 32, 64, 128, 256)],
      # No `cotangent` keyword: the adapter keeps the loss's cotangents from the hooks.
      "autotune_bwd_key": lambda op, x, *, scale: {"op": op, "pass": "backward"},
      "autotune_bwd_default": lambda target, x, *, scale: ToyConfig(16),
      "bwd_candidates": lambda target, x, *, scale: [ToyConfig(b, 8) for b in (32, 64, 128)],
  }
  for name in hooks + (BWD_HOOKS if grad else ()):
    setattr(config, name, hook_fns[name])
  return registry.OpFolder("toy", tmp_path, package=types.SimpleNamespace(toy=_toy),
                           specs=types.SimpleNamespace(CASES=cases, GRAD_CASES=grad_cases),
                           config=config)


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
  """Contract drift shows here: every public op of every folder maps its cases to keys, and
  its grad cases to backward keys (or says why its backward takes no config)."""
  for folder in registry.load():
    for op in folder.public_ops:
      for backward, catalogue in ((False, folder.cases), (True, folder.grad_cases)):
        mine = registry.quick_subset([c for c in catalogue if c.op == op])
        if not mine:
          continue
        try:
          adapter = adapters.adapter_for(folder, op, backward=backward)
        except adapters.NoBackwardConfig:
          assert backward and (folder.name, op) in adapters.NO_BWD_CONFIG
          continue
        groups = tuner.group_by_key(adapter, mine, cases_per_key=1)
        assert groups and all(isinstance(key, dict) for key, _ in groups), (folder.name, op)
        args, kwargs = folder.bind(groups[0][1][0], groups[0][1][0].abstract_inputs())
        configs = candidates.enumerate_configs(adapter, autotune_main.ASSUMED_TARGET, args,
                                               kwargs)
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


def test_generic_grid_knows_suffixed_field_names():
  """A backward config's fields name their kernel (num_warps_dq): same usual values."""
  @dataclasses.dataclass(frozen=True)
  class TwoKernels:
    block_q_dq: int = 64
    num_warps_dq: int = 4
    num_stages_dkv: int = 2

  grid = candidates.generic_grid(TwoKernels, TwoKernels(), limit=1000)
  assert {c.num_warps_dq for c in grid} == {1, 2, 4, 8, 16}
  assert {c.num_stages_dkv for c in grid} == {1, 2, 3, 4, 5}
  assert {c.block_q_dq for c in grid} == {16, 32, 64, 128, 256}


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


# --- Backward keys (GRAD_CASES, candidates passed as bwd_config=) ------------------------------

def test_plan_groups_grad_cases_under_backward_keys():
  folders = registry.load(["attention", "matmul", "normalization"])
  planned = autotune_main.plan(folders, autotune_main.parse_args(["--quick"]))
  by_name = {(folder.name, name): (adapter, groups) for adapter, folder, name, groups in planned}
  attention = folders[0]

  forward, forward_groups = by_name["attention", "attention"]
  assert not forward.backward and forward.config_kwarg == "config"
  assert forward_groups and all("pass" not in key for key, _ in forward_groups)
  backward, groups = by_name["attention", "attention backward"]
  assert backward.backward and backward.config_kwarg == "bwd_config"
  assert backward.config_cls is config_bwd.AttentionBwdConfig
  assert groups and all(attention.is_grad_case(c) for _, cases in groups for c in cases)
  for key, cases in groups:  # the key config_bwd.resolve looks up for the case's call
    for case in cases:
      q, k = case.abstract_inputs()[:2]
      assert key == config_bwd.bwd_tuning_key(
          head_dim=q.shape[-1], dtype=q.dtype, causal=case.kwargs.get("causal", True),
          q_len=q.shape[1], kv_len=k.shape[1]), case.label

  for op, kind in (("rms_norm", "rms_bwd"), ("layer_norm", "layer_bwd")):
    adapter, groups = by_name["normalization", f"{op} backward"]
    assert adapter.config_cls is norm_config.NormConfig
    assert groups and {key["kind"] for key, _ in groups} == {kind}
  assert isinstance(by_name["matmul", "matmul backward"][0], adapters.NoBackwardConfig)

  for passes, wanted in (("forward", {False}), ("backward", {True})):
    planned = autotune_main.plan(folders, autotune_main.parse_args(["--quick", "--pass", passes]))
    assert {name.endswith(" backward") for _, _, name, _ in planned} == wanted


def test_norm_rows_without_a_backward_kernel_get_no_key():
  """Rows padded wider than BWD_MAX_BLOCK_WIDTH run the XLA backward: nothing to tune."""
  folder = registry.load(["normalization"])[0]
  adapter = adapters.adapter_for(folder, "rms_norm", backward=True)
  wide = [c for c in folder.grad_cases if c.op == "rms_norm" and "d=16384" in c.label]
  assert wide and tuner.group_by_key(adapter, wide) == []
  groups = tuner.group_by_key(adapter, folder.grad_cases, cases_per_key=100)
  assert groups and all(key["width"] <= norm_config.BWD_MAX_BLOCK_WIDTH for key, _ in groups)
  assert not any("d=16384" in c.label for _, cases in groups for c in cases)


def test_bwd_candidates_fit_and_start_at_the_heuristic():
  for head_dim, dtype in ((64, "bfloat16"), (128, "bfloat16"), (256, "bfloat16"),
                          (128, "float32")):
    q = jax.ShapeDtypeStruct((1, 128, 8, head_dim), dtype)
    found = config_bwd.bwd_candidates(TOY_GPU, q, q, q)
    default = config_bwd.heuristic(TOY_GPU, head_dim=head_dim, dtype=dtype)
    assert found[0] == default and len(found) == len(set(found)) > 24
    limit = max(config_bwd.MAX_ACCUMULATOR_REGISTERS,
                config_bwd.accumulator_registers(default, head_dim))
    for cfg in found:
      assert config_bwd.shared_memory_bytes(cfg, head_dim, dtype) <= 227 * 1024
      assert config_bwd.accumulator_registers(cfg, head_dim) <= limit
    # One step from the heuristic come first: a single field of one kernel changed.
    assert all(sum(a != b for a, b in zip(dataclasses.astuple(c), dataclasses.astuple(default)))
               == 1 for c in found[1:6])


def _tiny_attention_grad_case():
  def make(key):
    return tuple(jax.random.normal(jax.random.fold_in(key, i), (1, 32, 2, 64), jnp.float32)
                 for i in range(4))  # q, k, v and the cotangent of the output
  return Case("attention", "grad tiny 32 causal f32", make, kwargs={"causal": True}, flops=1.0,
              array_kwargs=("cotangent",))


def test_tune_backward_key_passes_bwd_config_and_resolve_reads_the_winner(tmp_path, monkeypatch):
  """The real attention backward adapter on a tiny grad case: candidates reach the op as
  bwd_config= (config stays None), the winner goes in the table under the backward key, and
  `config_bwd.resolve` returns it; the forward's resolve is unaffected."""
  seen = []

  @functools.wraps(attention_api.attention)  # its signature, for the adapter's key
  def spy(q, k, v, *, impl=None, config=None, bwd_config=None, **kwargs):
    seen.append((config, bwd_config))
    return attention_api.attention(q, k, v, impl="xla", **kwargs)  # no GPU: time the reference

  case = _tiny_attention_grad_case()
  real = registry.load(["attention"])[0]
  folder = dataclasses.replace(real, package=types.SimpleNamespace(attention=spy),
                               specs=types.SimpleNamespace(CASES=[], GRAD_CASES=[case]))
  adapter = adapters.adapter_for(folder, "attention", backward=True)
  [(key, cases)] = tuner.group_by_key(adapter, folder.grad_cases)
  assert key == config_bwd.bwd_tuning_key(head_dim=64, dtype=jnp.float32, causal=True,
                                          q_len=32, kv_len=32)
  args, kwargs = folder.bind(case, case.abstract_inputs())
  tried = candidates.enumerate_configs(adapter, TOY_GPU, args, kwargs, limit=3)
  assert tried[0] == config_bwd.heuristic(TOY_GPU, head_dim=64, dtype=jnp.float32)
  cost = {None: 5.0, tried[0]: 2.0, tried[1]: 1.0, tried[2]: 3.0}
  timer = lambda fn, input_sets, what: timing.Timing(*[cost[what["config"]]] * 4, 1, "fake")

  result = tuner.tune_key(adapter, key, cases, TOY_GPU, timer, limit=3, rotate_bytes=0,
                          log=lambda _: None)
  assert [t.status for t in result.trials] == [runner.OK] * 3
  assert result.winner.config == tried[1] and result.current.score_ms == pytest.approx(5.0)
  assert {b for c, b in seen} >= set(tried) and all(c is None for c, _ in seen)

  tuner.write_winners(tmp_path, "attention", TOY_GPU.device_kind, [result])
  monkeypatch.setattr(config_bwd, "OP_DIR", tmp_path)
  monkeypatch.setattr(attention_config, "OP_DIR", tmp_path)
  monkeypatch.setattr(device, "current_target", lambda: TOY_GPU)
  shape = dict(head_dim=64, dtype=jnp.float32, causal=True, q_len=32, kv_len=32)
  assert config_bwd.resolve(None, **shape) == tried[1]
  assert config_bwd.resolve(None, **{**shape, "causal": False}) == tried[0]  # other key
  assert attention_config.resolve(None, **shape) == attention_config.heuristic(
      TOY_GPU, head_dim=64, dtype=jnp.float32)


def test_norm_backward_key_is_the_one_resolve_bwd_reads(tmp_path, monkeypatch):
  folder = registry.load(["normalization"])[0]
  adapter = adapters.adapter_for(folder, "layer_norm", backward=True)
  case = next(c for c in folder.grad_cases if c.op == "layer_norm" and "+residual" in c.label)
  x = case.abstract_inputs()[0]
  [(key, _)] = tuner.group_by_key(adapter, [case])
  tuned = norm_config.NormConfig(2, 2, 2)
  config_lib.write_table(tmp_path, "normalization", TOY_GPU.device_kind, jax.__version__,
                         [{"key": tuner.jsonable_key(key), "config": dataclasses.asdict(tuned)}])
  monkeypatch.setattr(norm_config, "OP_DIR", tmp_path)
  monkeypatch.setattr(device, "current_target", lambda: TOY_GPU)
  args = (x.shape[-1], x.dtype, True, "layer")
  assert norm_config.resolve_bwd(None, *args) == tuned
  explicit = norm_config.NormConfig(1, 4, 1)
  assert norm_config.resolve_bwd(explicit, *args) == explicit  # explicit wins over the table
  assert norm_config.resolve(None, *args) == norm_config.heuristic(TOY_GPU, x.shape[-1])


def test_gpu_run_tunes_the_backward_with_a_toy_op(tmp_path, monkeypatch, capsys):
  """`--pass backward` on the toy op: grad cases only, winners under the backward key."""
  folder = _toy_folder(tmp_path, grad=True)
  fake_timer.name = "fake"
  monkeypatch.setattr(autotune_main, "on_gpu", lambda: True)
  monkeypatch.setattr(registry, "load", lambda: [folder])
  monkeypatch.setattr(device, "current_target", lambda: TOY_GPU)
  monkeypatch.setattr(timing, "make_timer", lambda *args, **kwargs: fake_timer)
  argv = ["--op", "toy", "--pass", "backward", "--out", str(tmp_path / "logs")]
  assert autotune_main.main(argv) == 0
  table = json.loads(config_lib.tuned_path(tmp_path, TOY_GPU.device_kind).read_text())
  # 64 gets the gradient wrong; 128 is the fastest right one (no forward refusal here).
  assert [(e["key"], e["config"]["block"]) for e in table["entries"]] == [
      ({"op": "toy", "pass": "backward"}, 128)]
  log = json.loads((tmp_path / "logs" / "autotune-toy-toy-backward.json").read_text())
  [record] = log["keys"]
  assert record["cases"] == ["grad toy n=64", "grad toy n=512"]
  assert [t["status"] for t in record["trials"]] == ["ok", "ok", "wrong", "ok"]
  assert "toy backward" in capsys.readouterr().out
