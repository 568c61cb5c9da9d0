"""`python -m engine.bench --suite paged` without timing anything that matters: the traces, the
in-flight and prefix arithmetic, the report's fields and its file, over the tiny random model."""

import dataclasses
import json
import types

import pytest

from engine import bench, bench_paged

# One v1 slot of 32 tokens against 4 pages of 8 shared by up to 2 sequences: the fewest programs
# (batch rungs 1 and 2, one chunk rung, one block-table rung) that still exercise every path.
TINY = bench_paged.Settings(num_requests=5, prompt_lens=(3, 12), output_lens=(2, 8),
                            max_seq_len=32, kv_budget_tokens=32, page_size=8, max_batch_size=2,
                            max_num_batched_tokens=16, decode_steps=4, prefix_requests=3,
                            system_len=10, suffix_lens=(1, 3), prefix_output_len=2)


def _output(first: float, finish: float):
  return types.SimpleNamespace(metrics=types.SimpleNamespace(first_token_time=first,
                                                             finish_time=finish))


def test_traces_are_seeded_and_within_their_ranges():
  s = bench_paged.QUICK
  trace = bench_paged.make_trace(s, vocab_size=49152)
  assert trace == bench_paged.make_trace(s, vocab_size=49152)
  assert trace != bench_paged.make_trace(dataclasses.replace(s, seed=1), vocab_size=49152)
  other_ids = bench_paged.make_trace(s, vocab_size=49152, variant=1)  # same lengths, other ids
  assert [(len(r.prompt), r.max_tokens) for r in other_ids] == [(len(r.prompt), r.max_tokens)
                                                                for r in trace]
  assert all(a.prompt != b.prompt for a, b in zip(trace, other_ids))
  assert len(trace) == s.num_requests
  assert all(s.prompt_lens[0] <= len(r.prompt) <= s.prompt_lens[1] for r in trace)
  assert all(s.output_lens[0] <= r.max_tokens <= s.output_lens[1] for r in trace)
  assert all(1000 <= t < 30000 for r in trace for t in r.prompt)
  prefix = bench_paged.make_prefix_trace(s, vocab_size=49152, variant=0)
  system = prefix[0].prompt[:s.system_len]
  assert all(r.prompt[:s.system_len] == system for r in prefix)
  assert len({tuple(r.prompt[s.system_len:]) for r in prefix}) == len(prefix)
  other = bench_paged.make_prefix_trace(s, vocab_size=49152, variant=1)
  assert other[0].prompt[:s.system_len] != system


@pytest.mark.parametrize("settings", [bench_paged.Settings(), bench_paged.QUICK, TINY])
def test_settings_fit_their_engines(settings):
  settings.check()
  assert settings.v1_slots * settings.max_seq_len == settings.kv_budget_tokens
  assert (settings.num_pages - 1) * settings.page_size == settings.kv_budget_tokens


def test_settings_refuse_requests_longer_than_max_seq_len():
  with pytest.raises(ValueError, match="max_seq_len"):
    dataclasses.replace(TINY, output_lens=(2, 30)).check()


def test_in_flight_time_average_and_peak():
  # Two sequences over [0, 4], a third over [4, 6]: 10 sequence-seconds in 10 s; a handover at
  # t=4 is not two at once.
  flight = bench_paged.in_flight([(0, 4), (0, 4), (4, 6)], start=0, end=10)
  assert flight == {"mean": pytest.approx(1.0), "max": 2}
  # Clipped to the run.
  assert bench_paged.in_flight([(-2, 2)], start=0, end=4)["mean"] == pytest.approx(0.5)


def test_static_batch_intervals_start_at_the_previous_batch_end():
  # Batch A: first token at 1, rows end at 2 and 3. Batch B: first token at 4, ends at 5.
  outs = [_output(1, 2), _output(1, 3), _output(4, 5)]
  assert bench_paged.static_batch_intervals(outs, start=0) == [(0, 2), (0, 3), (3, 5)]


def test_time_average_weights_each_sample_until_the_next():
  samples = [(0.0, 0, 0), (1.0, 4, 8), (3.0, 2, 4), (4.0, 0, 0)]
  assert bench_paged.time_average(samples, 1) == pytest.approx((0 * 1 + 4 * 2 + 2 * 1) / 4)


def test_expected_prefix_counts_full_pages_of_the_system_prompt():
  s = dataclasses.replace(TINY, system_len=20, page_size=8)
  trace = bench_paged.make_prefix_trace(s, vocab_size=320, variant=0)
  e = bench_paged.expected_prefix(s, trace)
  prompt = sum(len(r.prompt) for r in trace)
  assert e["shared_tokens_per_request"] == 16
  assert e["computed_tokens"] == prompt - 16 * (len(trace) - 1)
  assert e["reduction"] == pytest.approx(16 * (len(trace) - 1) / prompt)


def test_expected_in_flight_ratio_is_capped_by_slots():
  trace = [bench_paged.TraceRequest([1] * 24, 8)] * 4  # 32 tokens each
  s = dataclasses.replace(TINY, max_seq_len=128, kv_budget_tokens=256, max_batch_size=4)
  e = bench_paged.expected_in_flight_ratio(s, trace)
  assert e["by_memory"] == pytest.approx(4.0) and e["by_slots"] == pytest.approx(2.0)
  assert e["expected"] == pytest.approx(2.0)


def test_paged_suite_settings_from_the_command_line():
  args = bench._parser().parse_args(["--suite", "paged", "--quick", "--num-requests", "7"])
  s = bench.paged_settings(args)
  assert s == dataclasses.replace(bench_paged.QUICK, num_requests=7)
  assert bench.paged_settings(bench._parser().parse_args([])) == bench_paged.Settings()
  assert bench._parser().parse_args([]).suite == "fixed"  # the default run is unchanged


@pytest.mark.slow  # ten tiny programs to compile, ~60 CPU-seconds
def test_paged_suites_report(tiny, tmp_path):
  model, tokenizer = tiny
  p = bench_paged.run(model, tokenizer, TINY)
  t, x = p["trace"], p["prefix"]
  trace = bench_paged.make_trace(TINY, model.config.vocab_size)
  want_tokens = sum(r.max_tokens for r in trace)  # ignore_eos: every output has its length
  for name, slots in (("v1", TINY.v1_slots), ("v2", TINY.max_batch_size)):
    r = t[name]
    assert r["generated_tokens"] == want_tokens, name
    assert 0 < r["in_flight_mean"] <= r["in_flight_max"] <= slots, name
    assert r["throughput_tokens_per_s"] > 0 and r["mean_ttft_ms"] > 0, name
    assert r["programs_compiled_while_timed"] == 0, name
  assert 0 <= t["v2"]["pool_used_mean"] <= 1 and t["v2"]["preemptions"] >= 0
  assert t["in_flight_ratio"] == pytest.approx(t["v2"]["in_flight_mean"]
                                               / t["v1"]["in_flight_mean"])
  assert t["same_tokens_requests"] == 1.0  # greedy, fp32: both engines give the argmax
  assert x["off_warm"]["cached_tokens"] == 0
  assert x["on_warm"]["computed_tokens"] == x["expected"]["computed_tokens"]
  assert x["on_warm"]["prompt_tokens"] == x["off_warm"]["prompt_tokens"]
  assert all(x[k]["programs_compiled_while_timed"] == 0 for k in ("off_warm", "on_warm",
                                                                    "on_cold"))
  v = p["verdicts"]
  assert set(v) == {"in_flight_ratio", "throughput_ratio", "prefill_reduction"}
  assert v["prefill_reduction"]["met"] is True
  assert all(isinstance(d["met"], bool) for d in v.values())

  # The report: the paged section joins a device file the fixed suite wrote, keeping its table.
  fixed = {"device": "cpu", "platform": "cpu", "model": "m", "dtype": "float32",
           "decode_steps": 4, "copy_bandwidth_gb_s": 1.0, "cpus": 2, "jax": "x", "hf": None,
           "command": "python -m engine.bench", "date": "today", "results": []}
  bench._write(fixed, tmp_path)
  result = bench._previous(tmp_path, "cpu")
  result["paged"] = {**p, "command": "python -m engine.bench --suite paged", "date": "today",
                     "jax": "x", "device": "cpu", "cpus": 2, "load_avg_1m_start": 1.0,
                     "quick": True}
  bench._write(result, tmp_path)
  saved = json.loads((tmp_path / "engine-cpu.json").read_text())
  assert saved["results"] == [] and saved["paged"]["verdicts"]["prefill_reduction"]["met"]
  md = (tmp_path / "engine-cpu.md").read_text()
  assert "# Engine benchmark: m float32 on cpu" in md
  for words in ("## Engine v2", "--suite paged", "### Memory and throughput", "### Prefix reuse",
                "target >= 3.0x", "target >= 1.5x"):
    assert words in md, words
