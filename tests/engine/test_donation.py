"""The KV cache (and the per-row sampling state) is donated: updated in place, step after step."""

import re

import jax
import numpy as np
import pytest

from engine import SamplingParams
from engine import batch as batching

_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)")


@pytest.fixture
def llm(llm_v1):
  """Engine v1: these tests read its programs and cache (engine v2's: test_paged_engine.py)."""
  return llm_v1


def _aliased_params(compiled) -> set[int]:
  header = compiled.as_text().split("\n", 1)[0]
  assert "input_output_alias" in header
  return {int(param) for _, param in _ALIAS.findall(header)}


def _inputs(llm, batch, prompt_len, prompts):
  reqs = llm._requests(prompts, SamplingParams(max_tokens=50, temperature=0.8, seed=1,
                                               ignore_eos=True))
  return (batching.prefill_inputs(reqs, batch, prompt_len),
          jax.device_put(batching.row_params(reqs, batch, llm.vocab_size)))


def _pointers(tree):
  return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def test_compiled_hlo_aliases_cache_inputs_to_outputs(llm):
  num_state = len(jax.tree.leaves(llm.programs.state))
  num_cache = len(jax.tree.leaves(llm.programs.cache_shape(1, 128)))
  prefill = llm._program("prefill", (1, 16, 128))
  decode = llm._program("decode", (1, 128))
  cache_params = set(range(num_state, num_state + num_cache))
  assert cache_params <= _aliased_params(prefill)
  num_rows = len(jax.tree.leaves(decode.out_info[1]))
  # decode: the cache and the per-row state (counts, seen, ...) both alias their outputs.
  assert set(range(num_state, num_state + num_cache + num_rows)) <= _aliased_params(decode)


def test_steps_update_the_cache_in_place(llm):
  prefill = llm._program("prefill", (1, 16, 128))
  decode = llm._program("decode", (1, 128))
  inputs, params = _inputs(llm, 1, 16, ["hello"])
  cache = llm.programs.model.init_cache(1, 128)
  cache_ptrs = _pointers(cache)
  state = llm.programs.state
  new_cache, rows, _ = prefill(state, cache, jax.device_put(inputs), params)
  assert all(x.is_deleted() for x in jax.tree.leaves(cache))  # donated: no longer usable
  assert _pointers(new_cache) == cache_ptrs
  rows_ptrs = _pointers(rows)
  stop = np.zeros((1,), bool)
  for _ in range(5):
    new_cache, rows, out = decode(state, new_cache, rows, params, stop)
    assert _pointers(new_cache) == cache_ptrs and _pointers(rows) == rows_ptrs
  assert int(new_cache.lengths[0]) == 5 + 5 * 4  # prompt, then 5 chunks of decode_steps=4


def test_generate_reuses_the_same_cache_buffers(llm):
  params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
  llm.generate(["hello", "there"], params)
  shape, cache = llm._cache
  ptrs = _pointers(cache)
  llm.generate(["other", "prompts"], params)
  assert llm._cache[0] == shape and _pointers(llm._cache[1]) == ptrs


def _live_bytes():
  return sum(x.nbytes for x in jax.live_arrays())


def test_memory_does_not_grow_with_steps(llm):
  prefill = llm._program("prefill", (4, 16, 128))
  decode = llm._program("decode", (4, 128))
  inputs, params = _inputs(llm, 4, 16, ["a", "bb", "ccc", "dddd"])
  stop = np.zeros((4,), bool)
  cache, rows, out = prefill(llm.programs.state, llm.programs.model.init_cache(4, 128),
                             jax.device_put(inputs), params)
  del out
  baseline = None
  for step in range(25):
    cache, rows, out = decode(llm.programs.state, cache, rows, params, stop)
    jax.block_until_ready(out)
    del out
    if baseline is None:
      baseline = _live_bytes()
    assert _live_bytes() == baseline, step


def test_resident_memory_flat_over_generate_calls(llm):
  psutil = pytest.importorskip("psutil")
  params = SamplingParams(max_tokens=30, temperature=0.7, ignore_eos=True)
  for _ in range(3):
    llm.generate(["abc", "def", "ghi"], params)
  before = psutil.Process().memory_info().rss
  live = _live_bytes()
  for _ in range(20):
    llm.generate(["abc", "def", "ghi"], params)
  assert _live_bytes() == live
  assert psutil.Process().memory_info().rss - before < 16 * 2**20
