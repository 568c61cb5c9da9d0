"""The benchmark suite without a GPU: its refusal, its listing, and the arithmetic and
bookkeeping that turn timings into a report (timings faked, kernels toy)."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._core.specs import Case
from pallas_kernels.bench import __main__ as bench_main
from pallas_kernels.bench import check, registry, report, roofline, runner, timing
from tests.conftest import HAS_GPU

ROOF = roofline.Roofline(peak_tflops=800.0, peak_gbps=3000.0, floor_ms=0.002, method="fake")


@pytest.mark.skipif(HAS_GPU, reason="the refusal is for machines without a GPU")
def test_refuses_to_time_on_cpu_and_lists_cases(capsys):
  assert bench_main.main([]) == 0
  out = capsys.readouterr().out
  assert "no GPU here" in out and "nothing is timed" in out
  for folder in registry.load():
    for case in folder.cases:
      assert case.label in out


def test_list_covers_every_case_of_every_op(capsys):
  folders = registry.load()
  assert [f.name for f in folders if f.error] == []
  assert bench_main.main(["--list"]) == 0
  out = capsys.readouterr().out
  for folder in folders:
    assert all(case.label in out for case in folder.cases), folder.name


def test_filters_and_unknown_op(capsys):
  cases = [Case("a", f"a {i}", lambda key: (), audit=i in (2, 3, 4)) for i in range(5)]
  cases += [Case("b", "b only", lambda key: ())]
  folder = registry.OpFolder("ab", registry.OPS_DIR, specs=types.SimpleNamespace(CASES=cases))
  assert [c.label for _, c in registry.select([folder], quick=True)] == ["a 2", "a 3", "b only"]
  assert [c.label for _, c in registry.select([folder], ops=["b"])] == ["b only"]
  assert [c.label for _, c in registry.select([folder], case_substring="A 4")] == ["a 4"]
  assert registry.unknown_ops([folder], ["ab", "a", "c"]) == ["c"]
  assert bench_main.main(["--list", "--op", "no_such_op"]) == 2
  assert "no_such_op" in capsys.readouterr().err


def test_roofline_arithmetic():
  # 1.6 TFLOP at 800 TFLOP/s = 2 ms; 3 GB at 3000 GB/s = 1 ms: compute sets the floor.
  assert roofline.floor_time_ms(1.6e12, 3e9, ROOF) == pytest.approx((2.0, "compute"))
  assert roofline.fraction(4.0, 1.6e12, 3e9, ROOF) == pytest.approx(0.5)
  assert roofline.tflops(1.6e12, 4.0) == pytest.approx(400.0)
  assert roofline.gbps(3e9, 4.0) == pytest.approx(750.0)
  # A norm: few FLOPs, 6 GB -> 2 ms memory floor; at 2.5 ms that is 80 % of the roofline.
  assert roofline.floor_time_ms(1e9, 6e9, ROOF) == pytest.approx((2.0, "memory"))
  assert roofline.fraction(2.5, 1e9, 6e9, ROOF) == pytest.approx(0.8)


def test_timing_helpers():
  t = timing.summarize([3.0, 1.0, 2.0, 2.0, 100.0], "fake")
  assert (t.median_ms, t.min_ms, t.reps) == (2.0, 1.0, 5)
  # CUPTI records of 3 calls of a two-kernel function -> the sum per call.
  records = [("k1", 1.0), ("k2", 0.5)] * 3
  assert timing.per_call_ms(records, 3) == [1.5, 1.5, 1.5]
  with pytest.raises(timing.TimingError, match="different kernels"):
    timing.per_call_ms(records[:-1], 3)
  with pytest.raises(timing.TimingError, match="no GPU kernel"):
    timing.per_call_ms([], 3)
  assert timing.num_input_sets(1 << 30) == 1
  assert timing.num_input_sets(1 << 10) == timing.MAX_SETS
  assert timing.num_input_sets(1 << 10, rotate_bytes=0) == 1
  assert timing.reps_for(1000.0, 300.0) == timing.MIN_REPS
  assert timing.reps_for(1e-6, 300.0) == timing.MAX_REPS


def test_wallclock_timer_runs_a_function():
  fn = jax.jit(lambda x: x + 1)
  t = timing.WallclockTimer(budget_ms=5, batches=3, batch_ms=1)(fn, [(jnp.ones(4),)])
  assert t.median_ms > 0 and t.method.startswith("wallclock")


def test_gate_rejects_wrong_results():
  ref = check.to_host(jnp.ones((4, 8), jnp.bfloat16))
  good = jnp.ones((4, 8), jnp.bfloat16)
  assert check.verdict(good, ref)[2]
  err, tol, ok = check.verdict(good * 1.1, ref)
  assert not ok and err == pytest.approx(0.1, rel=0.05) and tol == pytest.approx(2e-2)
  assert not check.verdict(good.at[0, 0].set(jnp.nan), ref)[2]
  assert check.verdict(good[:2], ref) == (math.inf, tol, False)
  assert not check.verdict((good, good), ref)[2]
  assert check.verdict(good * 1.1, ref, rtol=0.2)[2]
  assert check.tolerance(jnp.ones(2, jnp.float32)) == check.GATE_TOLERANCE[jnp.dtype(jnp.float32)]


def _toy_folder(tmp_path):
  """A public op `toy(x, *, scale, impl)` with peers: a slow correct one and a fast wrong one."""
  def toy(x, *, scale, impl=None):
    if impl == "mosaic":
      raise ValueError("toy: impl='mosaic' is not implemented for this op; available: ('xla',)")
    return x * scale

  peers = {"xla": lambda x, *, scale: x * scale,
           "slow-right": lambda x, *, scale: x * scale,
           "fast-wrong": lambda x, *, scale: x * scale + 1,
           "broken": lambda x, *, scale: x.no_such_method()}
  case = Case("toy", "toy n=1024", lambda key: (jax.random.normal(key, (1024,)),),
              kwargs={"scale": 3.0}, flops=1024.0, bytes_moved=8192.0)
  return registry.OpFolder("toy", tmp_path, package=types.SimpleNamespace(toy=toy),
                           specs=types.SimpleNamespace(CASES=[case], peers=lambda: peers)), case


def test_run_case_gates_and_ranks(tmp_path):
  folder, case = _toy_folder(tmp_path)
  cost = {"pallax-triton": 2.0, "xla": 8.0, "slow-right": 4.0, "fast-wrong": 0.5}

  def fake_timer(fn, input_sets, what):
    expected = input_sets[0][0] * 3.0 + (what["impl"] == "fast-wrong")
    np.testing.assert_allclose(fn(*input_sets[0]), expected, rtol=1e-6, atol=1e-6)
    ms = cost[what["impl"]]
    return timing.Timing(ms, ms, ms, ms, 1, "fake")

  rows = runner.run_case(folder, case, fake_timer, ROOF, rotate_bytes=0, log=lambda _: None)
  by_impl = {r.impl: r for r in rows}
  assert "pallax-mosaic" not in by_impl  # not offered: no row
  assert by_impl["fast-wrong"].status == runner.WRONG, by_impl["fast-wrong"].error
  assert by_impl["broken"].status in (runner.REFUSED, runner.ERROR) and by_impl["broken"].error
  ours = by_impl["pallax-triton"]
  assert ours.status == runner.OK and ours.rel_err == 0.0
  assert ours.vs_best_peer == pytest.approx(4.0 / 2.0)  # the fast wrong peer is not the best
  assert ours.gbps == pytest.approx(8192.0 / 2.0 / 1e6)
  assert ours.bound == "memory"


def _synthetic_rows():
  rows = []
  for impl, kind, ms in (("pallax-triton", "ours", 4.0), ("xla", "peer", 8.0)):
    row = runner.Row("attention", "llama3-8b prefill 4k causal bf16", impl, kind,
                     flops=1.6e12, bytes_moved=3e9)
    runner.fill_speed(row, timing.Timing(ms, ms, ms, ms, 10, "fake"), ROOF)
    row.status, row.rel_err = runner.OK, 1e-3
    rows.append(row)
  rows.append(runner.Row("attention", "llama3-8b prefill 4k causal bf16", "jax-pallas", "peer",
                         status=runner.ERROR, error="ValueError: GQA | not supported"))
  runner.rank_against_peers(rows)
  return rows


def test_report_from_synthetic_rows(tmp_path):
  rows = _synthetic_rows()
  assert rows[0].vs_best_peer == pytest.approx(2.0)
  assert rows[0].roofline_fraction == pytest.approx(0.5) and rows[0].bound == "compute"
  meta = {"device_kind": "NVIDIA H100 80GB HBM3", "date": "2026-01-02", "time_utc": "x",
          "git_commit": "abc", "jax": jax.__version__, "timer": "fake"}
  out_dir = report.results_dir(meta, tmp_path)
  assert out_dir.name == "2026-01-02-nvidia-h100-80gb-hbm3"
  stem = report.file_stem(["attention"], "4k causal", quick=True)
  assert stem == "bench-attention-case-4k-causal-quick"
  paths = report.write_all(out_dir, stem, meta, ROOF, rows)
  assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
  data = json.loads((out_dir / f"{stem}.json").read_text())
  assert data["meta"]["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert data["roofline"]["peak_tflops"] == 800.0
  assert [r["impl"] for r in data["rows"]] == ["pallax-triton", "xla", "jax-pallas"]
  md = (out_dir / f"{stem}.md").read_text()
  assert ("| llama3-8b prefill 4k causal bf16 | **pallax-triton** | ok | 4.0000 | 400.0 | 750 "
          "| 50.0% | compute | 2.00× |") in md
  assert "2.00×" in md and "GQA / not supported" in md
  assert (out_dir / f"{stem}.png").stat().st_size > 1000


def test_gpu_run_end_to_end_with_a_toy_op(tmp_path, monkeypatch, capsys):
  """The GPU path of the CLI, on a toy op with a fake timer and a fake roofline."""
  folder, _ = _toy_folder(tmp_path)

  def fake(fn, input_sets, what):
    return timing.Timing(1.0, 1.0, 1.0, 1.0, 3, "fake")
  fake.name = "fake"
  monkeypatch.setattr(bench_main, "on_gpu", lambda: True)
  monkeypatch.setattr(registry, "load", lambda: [folder])
  monkeypatch.setattr(timing, "make_timer", lambda *args, **kwargs: fake)
  monkeypatch.setattr(roofline, "measure", lambda timer: ROOF)
  assert bench_main.main(["--out", str(tmp_path / "out"), "--op", "toy"]) == 0
  data = json.loads((tmp_path / "out" / "bench-toy.json").read_text())
  assert {r["impl"]: r["status"] for r in data["rows"]}["pallax-triton"] == "ok"
  assert "| toy n=1024 | **pallax-triton** | ok |" in capsys.readouterr().out


def test_roofline_measure_with_a_fake_timer():
  fake = lambda fn, input_sets, what: timing.Timing(2.0, 2.0, 2.0, 2.0, 1, "fake")  # noqa: E731
  roof = roofline.measure(fake, matmul_n=64, copy_bytes=1 << 12, wallclock=fake)
  assert roof.peak_tflops == pytest.approx(2 * 64**3 / 2.0 / 1e9)
  assert roof.peak_gbps == pytest.approx(2 * (1 << 12) / 2.0 / 1e6)
  assert roof.floor_ms == roof.dispatch_ms == 2.0
