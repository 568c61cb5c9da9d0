"""The paged cache path of the decoders: chunked prefill and decode over pages scattered through
the pool in random order give the logits of the uncached forward; writes go only to the pages the
block table names (the scratch page aside); the pool is donated and updated in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import paged_cache
from models.paged_cache import NULL_PAGE, PagedKVCache
from tests.models.conftest import TINY, random_llama

PAGE_SIZE = 4


def _forward(model, tokens):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


def _steps(model):
  graphdef, state = nnx.split(model)
  prefill = jax.jit(lambda s, *a: nnx.merge(graphdef, s).paged_prefill(*a), donate_argnums=4)
  decode = jax.jit(lambda s, *a: nnx.merge(graphdef, s).paged_decode(*a), donate_argnums=3)
  return (lambda *a: prefill(state, *a)), (lambda *a: decode(state, *a))


def _random_tables(rng, batch: int, pages_per_seq: int, num_pages: int) -> np.ndarray:
  """Disjoint pages in random order, never the scratch page."""
  pages = rng.permutation(np.arange(1, num_pages))[:batch * pages_per_seq]
  return pages.reshape(batch, pages_per_seq).astype(np.int32)


def _model(family: str):
  if family == "gpt2":
    from models import hf
    from tests.models._hf_random import HF_RANDOM
    return hf.load_model(HF_RANDOM / "gpt2")
  return random_llama(TINY if family == "llama" else TINY.replace(sliding_window=5))


@pytest.mark.parametrize("family", ["llama", "llama-window", "gpt2"])
def test_paged_chunked_prefill_and_decode_match_uncached(family):
  model = _model(family)
  config = model.config
  rng = np.random.default_rng(0)
  batch, total, decode_steps = 3, 14, 4
  seq = jnp.asarray(rng.integers(0, config.vocab_size, (batch, total)), jnp.int32)
  full = _forward(model, seq)
  pages_per_seq = -(-total // PAGE_SIZE)
  tables = jnp.asarray(_random_tables(rng, batch, pages_per_seq, 16))
  cache = model.init_paged_cache(16, PAGE_SIZE)
  prefill, decode = _steps(model)
  # Two chunks of ragged prompts (lengths 10, 1, 7), the first cut at 5 tokens: row 1's prompt
  # ends in the first chunk, and it sits out the second with length 0.
  prompt = np.asarray([10, 1, 7])
  first = np.minimum(prompt, 5)
  chunk = jnp.where(jnp.arange(5)[None] < first[:, None], seq[:, :5], 0)
  logits, cache = prefill(chunk, jnp.asarray(first, jnp.int32), jnp.zeros(3, jnp.int32), cache,
                          tables)
  np.testing.assert_allclose(logits, full[np.arange(3), first - 1], atol=2e-5, rtol=0)
  rest = prompt - first  # [5, 0, 2]; a zero-length row takes no part (its writes are dropped)
  chunk2 = jnp.stack([jnp.where(jnp.arange(5) < r, seq[b, f:f + 5], 0)
                      for b, (f, r) in enumerate(zip(first, rest))])
  logits, cache = prefill(chunk2, jnp.asarray(rest, jnp.int32), jnp.asarray(first, jnp.int32),
                          cache, tables)
  for b in (0, 2):
    np.testing.assert_allclose(logits[b], full[b, prompt[b] - 1], atol=2e-5, rtol=0)
  positions = prompt.copy()
  for step in range(decode_steps):
    tokens = seq[np.arange(3), positions]
    logits, cache = decode(tokens, jnp.asarray(positions, jnp.int32), cache, tables)
    np.testing.assert_allclose(logits, full[np.arange(3), positions], atol=2e-5, rtol=0,
                               err_msg=f"decode step {step}")
    positions = positions + 1


def test_writes_touch_only_the_named_pages_and_the_pool_is_donated():
  model = random_llama(TINY.replace(num_layers=1))
  cache = model.init_paged_cache(8, PAGE_SIZE)
  pointers = [x.unsafe_buffer_pointer() for x in (*cache.k, *cache.v)]
  prefill, decode = _steps(model)
  # Row 0 owns pages [5, 2], row 1 is padding (scratch page, length 0).
  tables = jnp.asarray([[5, 2], [NULL_PAGE, NULL_PAGE]], jnp.int32)
  tokens = jnp.asarray([[3, 4, 5, 6, 7, 0], [0] * 6], jnp.int32)
  _, cache = prefill(tokens, jnp.asarray([5, 0], jnp.int32), jnp.zeros(2, jnp.int32), cache,
                     tables)
  _, cache = decode(jnp.asarray([9, 0], jnp.int32), jnp.asarray([5, 0], jnp.int32), cache, tables)
  assert [x.unsafe_buffer_pointer() for x in (*cache.k, *cache.v)] == pointers
  k = np.asarray(cache.k[0])
  filled = np.abs(k).sum(axis=(2, 3)) > 0  # [num_pages, page_size]
  expect = np.zeros_like(filled)
  expect[5, :] = True      # positions 0..3
  expect[2, :2] = True     # positions 4 (prefill) and 5 (decode)
  expect[NULL_PAGE, 0] = filled[NULL_PAGE, 0]  # the padding row's decode write
  np.testing.assert_array_equal(filled, expect)


def test_gather_and_slots():
  pages = jnp.arange(4 * 2 * 1 * 1, dtype=jnp.float32).reshape(4, 2, 1, 1)
  tables = jnp.asarray([[3, 1]], jnp.int32)
  np.testing.assert_array_equal(paged_cache.gather(pages, tables)[0, :, 0, 0], [6, 7, 2, 3])
  slot = paged_cache.slots(tables, jnp.asarray([[0, 3, 2]]), jnp.asarray([[True, True, False]]),
                           2, 4)
  np.testing.assert_array_equal(slot, [[6, 3, 8]])


def test_bad_paged_inputs_name_the_argument():
  model = random_llama(TINY.replace(num_layers=1))
  cache = model.init_paged_cache(4, PAGE_SIZE)
  tokens = jnp.zeros((2,), jnp.int32)
  with pytest.raises(TypeError, match="`block_tables` expected int32"):
    model.paged_decode(tokens, tokens, cache, jnp.zeros((2, 2), jnp.float32))
  with pytest.raises(TypeError, match="`cache` expected a PagedKVCache"):
    model.paged_decode(tokens, tokens, model.init_cache(2, 8), jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(TypeError, match="`positions` expected int32"):
    model.paged_decode(tokens, jnp.zeros((3,), jnp.int32), cache, jnp.zeros((2, 2), jnp.int32))
  assert isinstance(cache, PagedKVCache) and cache.page_size == PAGE_SIZE
