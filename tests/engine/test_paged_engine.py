"""Engine v2 end to end over the tiny model: the same tokens as engine v1 with a roomy pool, a
pool that forces queueing and preemption, and prefix caching on and off; scripted use
(add_request / step / abort); random workloads that must leave no page behind; bounded
compilation; the page pool donated in place.

Two small engines beside the session's (`llm_v2`, roomy, prefix caching on): `tight`, a pool of
16 pages of 4 tokens (64 positions) for 4 rows of up to 128, and `uncached`, prefix caching off.
Both take at most 16 prompt tokens per step, so they compile six programs each.
"""

import re

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams, steps
from engine.buckets import PagedBuckets, bucket
from tests.engine.conftest import MAX_BATCH, MAX_SEQ
from tests.engine.test_compile import assert_warmup_for_covers_generate

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
SMALL = dict(max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, decode_steps=4, page_size=4,
             max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tight(tiny):
  return LLM.from_model(*tiny, num_pages=17, **SMALL)


@pytest.fixture(scope="module")
def uncached(tiny):
  return LLM.from_model(*tiny, enable_prefix_caching=False, **SMALL)


def _prompts(n=10):
  """Ragged prompts, 3 to 40 tokens."""
  return [f"p{i} " + "abcdefghij"[:i] * (1 + i % 4) for i in range(n)]


def _tokens(outs):
  return [o.token_ids for o in outs]


def _assert_pool_empty(llm):
  llm.block_manager.check_invariants()
  assert llm.block_manager.num_used_pages == 0 and not llm.has_unfinished_requests()


def test_greedy_equals_v1_with_a_roomy_pool(llm_v2, llm_v1):
  prompts = _prompts()
  assert _tokens(llm_v2.generate(prompts, GREEDY)) == _tokens(llm_v1.generate(prompts, GREEDY))
  _assert_pool_empty(llm_v2)


def test_greedy_equals_v1_when_the_pool_forces_preemption(tight, llm_v1):
  prompts = _prompts()
  before = tight.num_preemptions
  outs = tight.generate(prompts, GREEDY)
  assert tight.num_preemptions > before  # 4 rows of up to 60 positions share 64
  assert _tokens(outs) == _tokens(llm_v1.generate(prompts, GREEDY))
  assert all(o.finish_reason == "length" and len(o.token_ids) == 20 for o in outs)
  _assert_pool_empty(tight)


def test_seeded_sampling_equals_v1_and_survives_preemption(tight, llm_v2, llm_v1):
  params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=i, ignore_eos=True,
                           repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
            for i in range(8)]
  prompts = _prompts(8)
  want = _tokens(llm_v1.generate(prompts, params))
  before = tight.num_preemptions
  assert _tokens(tight.generate(prompts, params)) == want
  assert tight.num_preemptions > before  # penalties and draws resumed exactly after recompute
  assert _tokens(llm_v2.generate(prompts, params)) == want


def test_prefix_caching_on_and_off(llm_v2, uncached, llm_v1):
  shared = "a shared system prompt of some length: "  # 39 bytes: 2 full pages of 16
  prompts = [shared + q for q in ("one", "two?", "three")]
  first = llm_v2.generate(prompts[0], GREEDY)[0]
  outs = llm_v2.generate(prompts[1:], GREEDY)
  assert first.num_cached_tokens == 0
  assert [o.num_cached_tokens for o in outs] == [32, 32]
  off = [uncached.generate(p, GREEDY)[0] for p in prompts]
  assert [o.num_cached_tokens for o in off] == [0, 0, 0]
  want = _tokens(llm_v1.generate(prompts, GREEDY))
  assert _tokens([first] + outs) == _tokens(off) == want
  _assert_pool_empty(llm_v2)


def test_scripted_add_step_abort(llm_v2):
  llm = llm_v2
  _drain(llm)
  params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
  ids = [llm.add_request(f"request {i}", params) for i in range(MAX_BATCH + 2)]
  assert ids == sorted(set(ids))
  llm.step()
  llm.step()
  running, waiting = ids[0], ids[-1]  # max_batch_size rows run, the last two wait
  assert llm.abort(running) and llm.abort(waiting)
  assert not llm.abort(waiting)  # already ended
  with pytest.raises(ValueError, match="`request_id`"):
    llm.abort(10**9)
  outs = _drain(llm)
  assert sorted(outs) == ids
  assert outs[running].finish_reason == outs[waiting].finish_reason == "abort"
  assert outs[waiting].token_ids == [] and outs[running].index == running
  assert 0 < len(outs[running].token_ids) < 40
  full = llm.generate("request 1", params)[0].token_ids
  assert outs[ids[1]].token_ids == full and outs[ids[1]].finish_reason == "length"
  assert outs[running].token_ids == llm.generate("request 0", params)[0].token_ids[
      :len(outs[running].token_ids)]
  _assert_pool_empty(llm)


def test_first_token_comes_back_from_the_step_of_its_last_prefill_chunk(uncached, monkeypatch):
  """Time to first token: the first token is read in the step() that ran the prompt's last
  chunk, not one step later behind a decode chunk; then one decode chunk per step."""
  llm = uncached  # 16 prompt tokens per step, decode chunks of 4
  _drain(llm)
  one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
  for length, num_chunks in [(5, 1), (16, 1), (40, 3)]:
    rid = llm.add_request([97 + length % 26] * length, one)
    assert [[o.request_id for o in llm.step()] for _ in range(num_chunks)] == (
        [[]] * (num_chunks - 1) + [[rid]])
  counts, step = [], llm._step

  def counting_step():
    ended = step()
    counts.append(len(stream.output.token_ids))
    return ended

  monkeypatch.setattr(llm, "_step", counting_step)
  stream = llm.stream([98] * 40, GREEDY)
  assert "".join(stream) == stream.output.text
  assert counts == [0, 0, 1, 5, 9, 13, 17, 20]
  _assert_pool_empty(llm)


def test_add_request_checks_like_generate(llm_v2, llm_v1):
  with pytest.raises(ValueError, match="`prompt`"):
    llm_v2.add_request("")
  with pytest.raises(ValueError, match="one str or list of token ids"):
    llm_v2.add_request(["a", "b"])
  with pytest.raises(ValueError, match="page_size"):
    llm_v1.step()


def test_a_prompt_beyond_the_pool_is_an_error(tiny):
  llm = LLM.from_model(*tiny, num_pages=5, **SMALL)  # 16 positions
  with pytest.raises(ValueError, match="page pool holds 16"):
    llm.generate([1] * 17, GREEDY)
  # One that fits gets max_tokens clamped to the pool, as to max_seq_len: 10 + 7 - 1 positions.
  assert llm._requests([[1] * 10], SamplingParams(max_tokens=50))[0].max_tokens == 7


def test_bad_paging_arguments(tiny):
  for kwargs, field in [(dict(page_size=0), "page_size"), (dict(num_pages=1), "num_pages"),
                        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
                        (dict(enable_prefix_caching=1), "enable_prefix_caching")]:
    with pytest.raises(ValueError, match=f"`{field}`"):
      LLM.from_model(*tiny, **kwargs)


def _drain(llm) -> dict:
  """Step until every request has ended and nothing is in flight: {request_id: output}."""
  outs = {}
  for _ in range(1000):
    outs.update((o.request_id, o) for o in llm.step())
    if not llm.has_unfinished_requests() and not llm._in_flight:
      return outs
  raise AssertionError("requests did not finish")


@st.composite
def workloads(draw):
  """Arrivals (prompt length, max_tokens, a shared prefix or not), aborts and steps."""
  return draw(st.lists(st.one_of(
      st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 30), st.booleans()),
      st.tuples(st.just("abort"), st.integers(0, 20)),
      st.tuples(st.just("step"), st.integers(1, 4))), min_size=1, max_size=14))


@settings(max_examples=8, deadline=None)
@given(events=workloads())
def test_random_workloads_finish_and_return_every_page(tight, events):
  llm = tight
  _drain(llm)  # what earlier tests left behind
  want_len, outs = {}, {}
  for event in events:
    if event[0] == "add":
      _, length, max_tokens, shared = event
      prompt = ([7] * 20 if shared else []) + [97 + len(want_len) % 26] * length
      rid = llm.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
      want_len[rid] = min(max_tokens, MAX_SEQ - len(prompt), 64 + 1 - len(prompt))
    elif event[0] == "abort" and want_len:
      llm.abort(list(want_len)[event[1] % len(want_len)])
    for _ in range(event[1] if event[0] == "step" else 1):
      outs.update((o.request_id, o) for o in llm.step())
      llm.scheduler.check_invariants()
  outs.update(_drain(llm))
  assert sorted(outs) == sorted(want_len)  # every request ended, once
  for rid, o in outs.items():
    assert o.finish_reason in ("length", "stop", "abort")
    if o.finish_reason == "length":
      assert len(o.token_ids) == want_len[rid]
  _assert_pool_empty(llm)


def test_compilations_bounded_over_many_prompt_lengths(tight):
  assert len(tight.paged_buckets.programs()) == 6  # batch 1, 2, 4 x (chunk 16 | decode) x 32
  tight.warmup()
  compiled = dict(tight.paged_programs.compiled)
  assert set(compiled) == set(tight.paged_buckets.programs())
  traced = sum(steps.TRACE_COUNTS.values())
  prompts = [[97 + i % 26] * n for i, n in enumerate(range(1, 61, 3))]
  params = [SamplingParams(max_tokens=1 + i % 9, temperature=0.5 * (i % 3), seed=i,
                           logprobs=2 if i % 4 == 0 else None) for i in range(len(prompts))]
  tight.generate(prompts, params)
  tight.generate(prompts[::-1], params[::-1])
  list(tight.stream(prompts[5], params[5]))
  assert sum(steps.TRACE_COUNTS.values()) == traced  # nothing new was traced or compiled
  assert tight.paged_programs.compiled == compiled


def test_warmup_for_compiles_what_generate_runs(uncached):
  prompts = ["a" * 40] * 3 + ["b"] * 2
  params = SamplingParams(max_tokens=5, temperature=0)
  assert_warmup_for_covers_generate(uncached, prompts, params)


_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)")


def _aliased_params(compiled) -> set[int]:
  header = compiled.as_text().split("\n", 1)[0]
  return {int(param) for _, param in _ALIAS.findall(header)}


def _pointers(tree):
  return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def test_page_pool_and_slots_are_donated(tight):
  programs = tight.paged_programs
  num_state = len(jax.tree.leaves(programs.state))
  num_donated = (len(jax.tree.leaves(jax.eval_shape(programs.init_cache)))
                 + len(jax.tree.leaves(jax.eval_shape(programs.init_slots))))
  donated = set(range(num_state, num_state + num_donated))
  for kind, shape in [("paged_prefill", (1, 16, 32)), ("paged_decode", (1, 32))]:
    assert donated <= _aliased_params(programs.get(kind, shape)), kind
  tight.generate("warm", GREEDY)
  pointers = _pointers(tight._pool)
  tight.generate(_prompts(6), GREEDY)
  assert _pointers(tight._pool) == pointers  # every step wrote in place


def test_stream_equals_generate_beside_other_requests(tight):
  params = SamplingParams(max_tokens=30, temperature=0.8, seed=4, ignore_eos=True)
  _drain(tight)
  others = {tight.add_request(p, GREEDY) for p in _prompts(4)}
  deltas = list(tight.stream("streamed text", params))
  assert set(_drain(tight)) == others  # their outputs wait for step()
  assert "".join(deltas) == tight.generate("streamed text", params)[0].text
  _assert_pool_empty(tight)


def test_prefill_chunks_are_split_to_pad_little():
  b = PagedBuckets.for_limits(32, 512, 16, 512)
  lens = [84, 67, 57, 37, 40, 19, 22, 17]
  groups = b.prefill_groups(lens)
  assert sorted(i for g in groups for i in g) == list(range(len(lens)))
  padded = sum(bucket(len(g), b.batch) * bucket(max(lens[i] for i in g), b.chunk) for g in groups)
  assert padded <= 8 * 128 // 1.5  # one program would compute 8 rows x 128
  assert b.prefill_groups([500]) == [[0]] and b.prefill_groups([]) == []


def test_a_failed_step_ends_live_requests_with_an_error_and_recovers(llm_v2, monkeypatch):
  llm = llm_v2
  _drain(llm)
  rid = llm.add_request("scripted", GREEDY)

  def broken(kind, shape):
    raise RuntimeError("device lost")

  monkeypatch.setattr(llm.paged_programs, "get", broken)
  with pytest.raises(RuntimeError, match="device lost"):
    llm.generate(["a", "b"], GREEDY)
  [out] = llm.step()
  assert out.request_id == rid and out.finish_reason == "error" and "device lost" in out.error
  monkeypatch.undo()
  assert _tokens(llm.generate(["a"], GREEDY)) == _tokens(llm.generate(["a"], GREEDY))
  _assert_pool_empty(llm)
