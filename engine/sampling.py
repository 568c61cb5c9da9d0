"""Sampling on device, vectorised over rows with per-row parameters; no host sync.

Everything here is plain jnp over `[batch, vocab]` logits, traced inside the prefill and decode
programs. Per-row parameters travel as `RowParams`, per-row running state as `RowState`: explicit
pytrees, not globals. Costly paths (penalties, the sort behind top-k/top-p, random draws, top-N
logprobs) sit behind `lax.cond` on "does any row need this", so a greedy batch pays for an argmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PAD = -1  # the token a finished (or padding) row emits
_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
  """Per-row sampling parameters; built on the host by `engine.batch` from SamplingParams."""
  temperature: jax.Array         # f32 [B]; 0 = greedy
  top_k: jax.Array               # i32 [B]; <= 0 = off
  top_p: jax.Array               # f32 [B]; 1 = off
  min_p: jax.Array               # f32 [B]; 0 = off
  repetition_penalty: jax.Array  # f32 [B]; 1 = off
  presence_penalty: jax.Array    # f32 [B]
  frequency_penalty: jax.Array   # f32 [B]
  key_data: jax.Array            # u32 [B, 2]; the row's key: its seed, or drawn by the engine
  stop_mask: jax.Array           # bool [B, V]; stop_token_ids, plus EOS unless ignore_eos
  max_tokens: jax.Array          # i32 [B]; after clamping to the cache
  want_logprobs: jax.Array       # bool [B]
  active: jax.Array              # bool [B]; False for the rows that only pad the batch bucket


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowState:
  """What changes every step. Donated between decode chunks."""
  last_token: jax.Array     # i32 [B]; the token the next decode step feeds
  num_generated: jax.Array  # i32 [B]; also the counter of the row's random draws
  done: jax.Array           # bool [B]
  counts: jax.Array         # i32 [B, V]; output-token counts (presence / frequency penalties)
  seen: jax.Array           # bool [B, V]; prompt or output token (repetition penalty)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
  """What the host reads back: one column per step; PAD where a row was done."""
  tokens: jax.Array       # i32 [B, steps]
  logprob: jax.Array      # f32 [B, steps]; of the sampled token (0 where not asked)
  top_ids: jax.Array      # i32 [B, steps, MAX_LOGPROBS]
  top_logprobs: jax.Array  # f32 [B, steps, MAX_LOGPROBS]


def initial_state(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> RowState:
  """tokens i32 [B, T] right-padded, lengths i32 [B]."""
  b, t = tokens.shape
  valid = jnp.arange(t)[None] < lengths[:, None]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], tokens.shape)
  seen = jnp.zeros((b, vocab_size), bool).at[rows, jnp.where(valid, tokens, vocab_size)].set(
      True, mode="drop")
  return RowState(last_token=jnp.zeros((b,), jnp.int32), num_generated=jnp.zeros((b,), jnp.int32),
                  done=jnp.zeros((b,), bool), counts=jnp.zeros((b, vocab_size), jnp.int32),
                  seen=seen)


def apply_penalties(logits: jax.Array, p: RowParams, s: RowState) -> jax.Array:
  rep = p.repetition_penalty[:, None]
  logits = jnp.where(s.seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  counts = s.counts.astype(logits.dtype)
  return (logits - p.frequency_penalty[:, None] * counts
          - p.presence_penalty[:, None] * (counts > 0).astype(logits.dtype))


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
  """Drop tokens whose probability is below min_p times the most likely token's."""
  probs = jax.nn.softmax(logits, axis=-1)
  keep = probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
  return jnp.where(keep, logits, _NEG_INF)


# top-k / top-p look at this many candidates (one lax.top_k) and fall back to a full sort only
# when a row's cut lies beyond them: a full sort of a 49152-token row costs ~50 ms on a CPU.
CANDIDATES = 64


def top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keep the top_k largest, then the smallest top set whose probability (renormalised after
  top_k) reaches top_p. Both cuts become one threshold on the logit value, so tokens tied with
  the cut-off token are kept (as in vLLM). Exact: candidates first, a full sort when needed."""
  vocab = logits.shape[-1]
  width = min(CANDIDATES, vocab)
  cand = jax.lax.top_k(logits, width)[0]
  full_lse = jax.nn.logsumexp(logits, axis=-1)
  k_off = (top_k <= 0) | (top_k >= vocab)
  # The candidates hold the whole cut when top_k is within them, or when top_k is off and the
  # candidates' mass already reaches top_p; otherwise sort the row.
  exact = ((top_k > 0) & (top_k <= width)) | (k_off & (
      (top_p >= 1) | (jnp.sum(_kept_probs(cand, top_k, full_lse), axis=-1) >= top_p)))
  threshold = jax.lax.cond(
      jnp.all(exact), lambda: _threshold(cand, top_k, top_p, full_lse),
      lambda: _threshold(-jnp.sort(-logits, axis=-1), top_k, top_p, full_lse))
  threshold = jnp.where(k_off & (top_p >= 1), _NEG_INF, threshold)
  return jnp.where(logits < threshold[:, None], _NEG_INF, logits)


def _kept_probs(desc, top_k, full_lse):
  """Probabilities of `desc` (a row's largest logits, descending) after the top_k cut,
  renormalised over the top_k when it lies within `desc`; 0 beyond top_k."""
  width = desc.shape[-1]
  k_set = (top_k > 0) & (top_k <= width)
  kept = jnp.where(jnp.arange(width)[None] < jnp.where(k_set, top_k, width)[:, None], desc,
                   _NEG_INF)
  lse = jnp.where(k_set, jax.nn.logsumexp(kept, axis=-1), full_lse)
  return jnp.exp(kept - lse[:, None])


def _threshold(desc, top_k, top_p, full_lse):
  """The smallest kept logit, from `desc` holding the cut (all of it, or the top candidates)."""
  probs = _kept_probs(desc, top_k, full_lse)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  in_p = (mass_before < top_p[:, None]) | (top_p >= 1)[:, None]
  keep = jnp.maximum(jnp.sum(in_p & (probs > 0), axis=-1), 1)
  return jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)[:, 0]


def _mix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def row_uniform(p: RowParams, s: RowState) -> jax.Array:
  """One uniform in (0, 1) per row from (row key, step): a counter-based hash, so a draw depends
  on neither the row's index nor its batch mates. (A threefry draw gives the same guarantee for
  seconds more compile time per program on a CPU.)"""
  step = s.num_generated.astype(jnp.uint32)
  h = _mix32(p.key_data[:, 0] ^ _mix32(p.key_data[:, 1] ^ _mix32(step + jnp.uint32(0x9E3779B9))))
  return ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


_BLOCK = 256


def inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
  """One index per row of probs [B, V] (need not sum to 1) for uniforms u [B].

  Two levels, blocks of 256 then within the chosen block, so the cost is about one pass over the
  row; a token of zero probability is never drawn."""
  b, vocab = probs.shape
  nb = -(-vocab // _BLOCK)
  blocks = jnp.pad(probs, ((0, 0), (0, nb * _BLOCK - vocab))).reshape(b, nb, _BLOCK)
  block_mass = jnp.sum(blocks, axis=-1)
  cum = jnp.cumsum(block_mass, axis=-1)
  target = u * cum[:, -1]
  bi = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), _last_positive(block_mass))
  inner = jnp.take_along_axis(blocks, bi[:, None, None], axis=1)[:, 0]
  before = jnp.take_along_axis(cum - block_mass, bi[:, None], axis=-1)[:, 0]
  j = jnp.sum(jnp.cumsum(inner, axis=-1) <= (target - before)[:, None], axis=-1)
  j = jnp.minimum(j, _last_positive(inner))
  j = jnp.where(jnp.take_along_axis(inner, j[:, None], axis=-1)[:, 0] > 0, j, _first_positive(inner))
  return (bi * _BLOCK + j).astype(jnp.int32)


def _last_positive(x):
  return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1])[None], 0), axis=-1)


def _first_positive(x):
  return jnp.argmax(x > 0, axis=-1)


def sample(logits: jax.Array, p: RowParams, s: RowState) -> jax.Array:
  """logits f32 [B, V] -> tokens i32 [B]. Penalties, temperature (0 = greedy), min_p, top_k,
  top_p, then a draw; every stage skipped when no row of the batch needs it."""
  penalised = (p.repetition_penalty != 1) | (p.presence_penalty != 0) | (p.frequency_penalty != 0)
  logits = jax.lax.cond(jnp.any(penalised & p.active), apply_penalties,
                        lambda l, *_: l, logits, p, s)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  stochastic = (p.temperature > 0) & p.active

  def draw(logits):
    x = logits / jnp.where(stochastic, p.temperature, 1.0)[:, None]
    x = jax.lax.cond(jnp.any(stochastic & (p.min_p > 0)), min_p_mask, lambda x, _: x, x, p.min_p)
    top_k, top_p = jnp.where(stochastic, p.top_k, 0), jnp.where(stochastic, p.top_p, 1.0)
    x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), top_k_top_p_mask, lambda x, *_: x,
                     x, top_k, top_p)
    return inverse_cdf(jax.nn.softmax(x, axis=-1), row_uniform(p, s))

  drawn = jax.lax.cond(jnp.any(stochastic), draw, lambda _: greedy, logits)
  return jnp.where(stochastic, drawn, greedy)


def logprobs(logits: jax.Array, tokens: jax.Array, want: jax.Array, top_n: int):
  """Raw-distribution logprobs of `tokens` [B] and the top_n per row; zeros when no row asks."""
  b = logits.shape[0]

  def compute(logits):
    lp = jax.nn.log_softmax(logits, axis=-1)
    sampled = jnp.take_along_axis(lp, jnp.maximum(tokens, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, top_n)
    return sampled, top_ids.astype(jnp.int32), top_lp

  def skip(_):
    return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, top_n), jnp.int32),
            jnp.zeros((b, top_n), jnp.float32))

  return jax.lax.cond(jnp.any(want), compute, skip, logits)


def advance(s: RowState, tokens: jax.Array, p: RowParams) -> tuple[RowState, jax.Array]:
  """Record a step's sampled tokens [B]; rows already done emit PAD. -> (state, emitted)."""
  live = ~s.done
  emitted = jnp.where(live, tokens, PAD)
  rows = jnp.arange(tokens.shape[0])
  safe = jnp.where(live, tokens, s.counts.shape[1])  # out of range: dropped
  counts = s.counts.at[rows, safe].add(1, mode="drop")
  seen = s.seen.at[rows, safe].set(True, mode="drop")
  num_generated = s.num_generated + live.astype(jnp.int32)
  hit_stop = p.stop_mask[rows, jnp.clip(tokens, 0, s.counts.shape[1] - 1)]
  done = s.done | (live & (hit_stop | (num_generated >= p.max_tokens)))
  last = jnp.where(live, tokens, s.last_token)
  return RowState(last, num_generated, done, counts, seen), emitted
