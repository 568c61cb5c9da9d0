"""Sampling semantics on crafted logits (eager jnp, small vocabularies), against numpy oracles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import sampling
from engine.batch import row_params

V = 100

# Jitted once: calling them eagerly would re-trace their lax.cond branches on every call.
sample = jax.jit(sampling.sample)
top_k_top_p_mask = jax.jit(sampling.top_k_top_p_mask)
min_p_mask = jax.jit(sampling.min_p_mask)
apply_penalties = jax.jit(sampling.apply_penalties)
inverse_cdf = jax.jit(sampling.inverse_cdf)
row_uniform = jax.jit(sampling.row_uniform)


def _params(b, **overrides):
  p = row_params([], b, V)
  p = dataclasses.replace(p, active=np.ones((b,), bool), temperature=np.ones((b,), np.float32),
                          max_tokens=np.full((b,), 10, np.int32))
  return dataclasses.replace(p, **{k: np.asarray(v) for k, v in overrides.items()})


def _state(b, prompt=None):
  tokens = np.zeros((b, 1), np.int32) if prompt is None else np.asarray(prompt, np.int32)
  return sampling.initial_state(jnp.asarray(tokens), jnp.full((b,), tokens.shape[1], jnp.int32), V)


def _kept(masked):
  return set(np.flatnonzero(np.isfinite(np.asarray(masked))))


def _reference_keep(logits, top_k, top_p):
  """vLLM: sort, keep the top_k, renormalise, keep while the mass before a token is < top_p."""
  order = np.argsort(-logits, kind="stable")
  k = top_k if 0 < top_k < len(logits) else len(logits)
  kept = order[:k]
  p = np.exp(logits[kept] - logits[kept].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  return set(kept[:max(1, int(np.sum(before < top_p)))]) if top_p < 1 else set(kept)


def test_greedy_is_argmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, V)).astype(np.float32)
  p = _params(3, temperature=np.zeros(3, np.float32), top_k=np.array([5, 0, 1], np.int32),
              top_p=np.array([0.5, 1, 1], np.float32))
  out = sample(jnp.asarray(logits), p, _state(3))
  np.testing.assert_array_equal(out, logits.argmax(-1))


def test_top_k_keeps_exactly_k():
  logits = np.arange(V, dtype=np.float32)[None]
  out = top_k_top_p_mask(jnp.asarray(logits), jnp.array([3]), jnp.array([1.0]))
  assert _kept(out[0]) == {97, 98, 99}


def test_top_p_keeps_smallest_set_reaching_p():
  probs = np.array([0.5, 0.25, 0.15, 0.1])
  logits = np.full((1, V), -np.inf, np.float32)
  logits[0, :4] = np.log(probs)
  for top_p, want in [(0.4, {0}), (0.5, {0}), (0.7, {0, 1}), (0.75, {0, 1}), (0.8, {0, 1, 2}),
                      (1.0, {0, 1, 2, 3})]:
    out = top_k_top_p_mask(jnp.asarray(logits), jnp.array([0]), jnp.array([top_p]))
    assert _kept(out[0]) == want, top_p


@pytest.mark.parametrize("flat", [False, True], ids=["peaked-candidates", "flat-full-sort"])
def test_top_k_top_p_match_reference(flat):
  """Random rows and per-row (top_k, top_p); flat rows need the full-sort fallback."""
  rng = np.random.default_rng(1)
  b, vocab = 6, 300
  logits = rng.normal(scale=0.3 if flat else 4.0, size=(b, vocab)).astype(np.float32)
  top_k = np.array([0, 5, 80, 0, 200, -1], np.int32)
  top_p = np.array([0.9, 1.0, 0.95, 0.5, 0.3, 1.0], np.float32)
  out = np.asarray(top_k_top_p_mask(jnp.asarray(logits), jnp.asarray(top_k),
                                             jnp.asarray(top_p)))
  for r in range(b):
    assert _kept(out[r]) == _reference_keep(logits[r], top_k[r], top_p[r]), r
    kept = list(_kept(out[r]))
    np.testing.assert_array_equal(out[r, kept], logits[r, kept])


def test_min_p():
  probs = np.array([0.5, 0.3, 0.12, 0.08])
  logits = np.full((1, V), -np.inf, np.float32)
  logits[0, :4] = np.log(probs)
  out = min_p_mask(jnp.asarray(logits), jnp.array([0.2]))
  assert _kept(out[0]) == {0, 1, 2}  # 0.08 < 0.2 * 0.5


def test_penalties_follow_vllm():
  logits = np.array([[2.0, -2.0, 2.0, -2.0, 1.0] + [0.0] * (V - 5)], np.float32)
  s = _state(1, prompt=[[0, 1]])  # prompt tokens 0 and 1
  s = dataclasses.replace(s, counts=s.counts.at[0, 2].set(3).at[0, 3].set(1),
                          seen=s.seen.at[0, 2].set(True).at[0, 3].set(True))
  p = _params(1, repetition_penalty=np.array([2.0], np.float32),
              presence_penalty=np.array([0.5], np.float32),
              frequency_penalty=np.array([0.25], np.float32))
  out = np.asarray(apply_penalties(jnp.asarray(logits), p, s))[0, :5]
  # Repetition over prompt + output (tokens 0-3): positive / 2, negative * 2. Presence and
  # frequency over output only (token 2 three times, token 3 once).
  np.testing.assert_allclose(out, [1.0, -4.0, 1.0 - 0.5 - 0.75, -4.0 - 0.5 - 0.25, 1.0])


def test_inverse_cdf_matches_distribution_and_skips_zeros():
  rng = np.random.default_rng(2)
  vocab = 700  # several blocks of 256, the last one partial
  probs = rng.dirichlet(np.ones(vocab) * 0.3)
  probs[rng.choice(vocab, 300, replace=False)] = 0
  probs /= probs.sum()
  n = 20000
  u = (np.arange(n) + 0.5) / n  # stratified: the empirical CDF must track the true one
  idx = np.asarray(inverse_cdf(jnp.asarray(np.tile(probs, (n, 1)), jnp.float32),
                                        jnp.asarray(u, jnp.float32)))
  assert probs[idx].min() > 0
  freq = np.bincount(idx, minlength=vocab) / n
  assert np.abs(np.cumsum(freq) - np.cumsum(probs)).max() < 2e-3


def test_row_uniform_depends_on_key_and_step_only():
  p = _params(4, key_data=np.array([[0, 7], [1, 7], [0, 7], [0, 8]], np.uint32))
  s = dataclasses.replace(_state(4), num_generated=jnp.array([3, 3, 3, 3]))
  u = np.asarray(row_uniform(p, s))
  assert u[0] == u[2] and len({u[0], u[1], u[3]}) == 3
  s2 = dataclasses.replace(s, num_generated=jnp.array([4, 3, 3, 3]))
  assert np.asarray(row_uniform(p, s2))[0] != u[0]
  many = dataclasses.replace(_state(1), num_generated=jnp.arange(5000))
  big = _params(5000, key_data=np.tile(np.array([[5, 9]], np.uint32), (5000, 1)))
  draws = np.asarray(row_uniform(big, many))
  assert 0 < draws.min() and draws.max() < 1
  assert np.histogram(draws, bins=10, range=(0, 1))[0].min() > 400  # ~500 per bin


def test_sampling_follows_the_distribution():
  """temperature 1 draws with frequencies close to softmax(logits). Batch 3, as in the greedy
  test, so the program is compiled once."""
  logits = np.full((3, V), -np.inf, np.float32)
  logits[:, :3] = np.log([0.6, 0.3, 0.1])
  p = _params(3, key_data=np.array([[0, 1], [0, 2], [0, 3]], np.uint32))
  s = _state(3)
  draws = [np.asarray(sample(jnp.asarray(logits), p,
                             dataclasses.replace(s, num_generated=jnp.full((3,), step, jnp.int32))))
           for step in range(500)]
  np.testing.assert_allclose(np.bincount(np.concatenate(draws), minlength=3)[:3] / 1500,
                             [0.6, 0.3, 0.1], atol=0.04)  # 3 sigma
