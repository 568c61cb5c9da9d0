"""A workload compiles a bounded set of programs, all of which `warmup()` compiles up front."""

import jax
import pytest

from engine import SamplingParams, steps


@pytest.fixture
def llm(llm_v1):
  """Engine v1: these tests read its programs and cache (engine v2's: test_paged_engine.py)."""
  return llm_v1


@pytest.fixture
def backend_compiles():
  """Counts XLA backend compilations while the test runs."""
  events = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


def _workload(llm):
  for n in (1, 2, 3, 4):
    prompts = [list(range(97, 97 + 1 + (i * 5) % 16)) for i in range(n)]  # 1..16 tokens
    llm.generate(prompts, [SamplingParams(max_tokens=3 + i, temperature=0.5 * i, top_p=0.9,
                                          seed=i, logprobs=i or None, stop=["zz"])
                           for i in range(n)])
    list(llm.stream(prompts[-1], SamplingParams(max_tokens=5)))


def test_warmup_then_workload_compiles_nothing(llm, backend_compiles):
  traced = sum(steps.TRACE_COUNTS.values())
  new = llm.warmup(prompt_lens=[16])
  # One trace per newly compiled program; batch rungs 1, 2, 4 x (prefill T=16, decode), S=128.
  assert sum(steps.TRACE_COUNTS.values()) == traced + new
  wanted = {(k, (b, 16, 128) if k == "prefill" else (b, 128)) for b in (1, 2, 4)
            for k in ("prefill", "decode")}
  assert wanted <= set(llm.programs.compiled)
  assert set(llm.programs.compiled) <= set(llm.buckets.programs())
  compiled = dict(llm.programs.compiled)
  traced = sum(steps.TRACE_COUNTS.values())
  _workload(llm)  # first pass: eager helpers (cache allocation) may compile tiny programs
  backend_compiles.clear()
  _workload(llm)
  assert llm.programs.compiled == compiled
  assert sum(steps.TRACE_COUNTS.values()) == traced
  assert backend_compiles == []
  assert llm.warmup(prompt_lens=[16]) == 0


def test_warmup_for_compiles_exactly_what_generate_runs(llm, backend_compiles):
  prompts = ["a" * 40] * 3 + ["b"] * 2  # max_batch_size 4: a batch of 4 and a batch of 1
  params = SamplingParams(max_tokens=5, temperature=0)
  assert_warmup_for_covers_generate(llm, prompts, params)


def assert_warmup_for_covers_generate(llm, prompts, params):
  """After warmup_for, generate traces nothing new, and a second warmup_for compiles nothing."""
  llm.warmup_for(prompts, params)
  traced = sum(steps.TRACE_COUNTS.values())
  llm.generate(prompts, params)
  assert sum(steps.TRACE_COUNTS.values()) == traced
  assert llm.warmup_for(prompts, params) == 0
