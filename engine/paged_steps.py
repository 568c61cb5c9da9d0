"""The device programs of engine v2: a chunk of prefill and a multi-step decode chunk over the
paged KV cache, with the per-slot sampling state kept on the device between steps.

Every running request owns a decode slot (a row of `Slots`) from admission to its end. The state
of its sampling (last token, draw counter, penalty counts, done) and its position live there, so
requests join and leave the decode batch without a host round trip:
  - `prefill_chunk` runs one chunk of several rows' prompts; a row whose prompt ends in the chunk
    samples its first token and writes its slot, its penalty state rebuilt from its history
    (prompt + the tokens generated before a preemption), so a recomputed request samples on
    exactly as it would have;
  - `decode_chunk` gathers the slots of the running rows into a batch, runs up to `steps` steps
    in one `lax.while_loop` (the loop of engine.steps), and scatters them back.
Both donate the page pool and the slots. Rows that are done (or only pad the batch bucket) write
their K/V to the scratch page, never into pages that another request may own by then.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from engine import sampling
from engine import steps as steps_lib
from engine.sampling import RowParams, RowState, StepOutput

NULL_PAGE = 0  # models.paged_cache.NULL_PAGE, the scratch page (the engine imports no model code)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """Per-slot decode state, one row per slot (max_batch_size rows). Donated between programs."""
  rows: RowState        # [S]
  positions: jax.Array  # i32 [S]; tokens whose K/V is in the pages: the next token's position


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkInputs:
  tokens: jax.Array        # i32 [B, T]; each row's chunk, right-padded
  lengths: jax.Array       # i32 [B]; 0 for rows that only pad the batch
  start: jax.Array         # i32 [B]; absolute position of tokens[:, 0]
  block_tables: jax.Array  # i32 [B, P]; NULL_PAGE past a row's pages
  slot: jax.Array          # i32 [B]; where a row whose history ends here samples into; S if not
  history: jax.Array       # i32 [B, L]; such a row's prompt + generated tokens, -1 padded
  num_prompt: jax.Array    # i32 [B]; how many of history are prompt (the rest count as output)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  slot: jax.Array          # i32 [B]; the rows' slots, S for rows that only pad the batch
  block_tables: jax.Array  # i32 [B, P]; covering every position the chunk can write


def init_slots(num_slots: int, vocab_size: int) -> Slots:
  rows = RowState(last_token=jnp.zeros((num_slots,), jnp.int32),
                  num_generated=jnp.zeros((num_slots,), jnp.int32),
                  done=jnp.ones((num_slots,), bool),
                  counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
                  seen=jnp.zeros((num_slots, vocab_size), bool))
  return Slots(rows, jnp.zeros((num_slots,), jnp.int32))


def restored_state(history: jax.Array, num_prompt: jax.Array, live: jax.Array,
                   vocab_size: int) -> RowState:
  """The RowState after `history` [B, L] (-1 padded): seen over all of it, counts and the draw
  counter over its generated part; rows not `live` are done."""
  b, width = history.shape
  valid = history >= 0
  generated = valid & (jnp.arange(width)[None] >= num_prompt[:, None])
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], history.shape)
  seen = jnp.zeros((b, vocab_size), bool).at[rows, jnp.where(valid, history, vocab_size)].set(
      True, mode="drop")
  counts = jnp.zeros((b, vocab_size), jnp.int32).at[
      rows, jnp.where(generated, history, vocab_size)].add(1, mode="drop")
  return RowState(last_token=jnp.zeros((b,), jnp.int32),
                  num_generated=jnp.sum(generated, axis=1, dtype=jnp.int32), done=~live,
                  counts=counts, seen=seen)


def _gather(tree, slot: jax.Array):
  """Rows `slot` [B] of every leaf; out-of-range slots (padding rows) read the last row, which
  the caller masks."""
  return jax.tree.map(lambda x: x[jnp.minimum(slot, x.shape[0] - 1)], tree)


def _scatter(tree, slot: jax.Array, rows):
  """Write rows [B] back at `slot`; out-of-range slots (padding rows) are dropped."""
  return jax.tree.map(lambda full, part: full.at[slot].set(part, mode="drop"), tree, rows)


def _row_params(params: RowParams, slot: jax.Array, live: jax.Array) -> RowParams:
  p = _gather(params, slot)
  return dataclasses.replace(p, active=p.active & live)


def prefill_chunk(graphdef, state, cache, slots: Slots, params: RowParams, inputs: ChunkInputs,
                  *, top_n: int):
  """One chunk of prompt per row -> (cache, slots, the first token of each row whose history
  ends here, as a one-column StepOutput; PAD for the other rows). `params` is per slot."""
  steps_lib.TRACE_COUNTS["paged_prefill"] += 1
  model = steps_lib.merge(graphdef, state)
  logits, cache = model.paged_prefill(inputs.tokens, inputs.lengths, inputs.start, cache,
                                      inputs.block_tables)
  num_slots = slots.positions.shape[0]
  final = inputs.slot < num_slots
  rows = restored_state(inputs.history, inputs.num_prompt, final, logits.shape[-1])
  rows, column = steps_lib.sample_step(logits, _row_params(params, inputs.slot, final), rows,
                                       top_n)
  slots = Slots(rows=_scatter(slots.rows, inputs.slot, rows),
                positions=slots.positions.at[inputs.slot].set(inputs.start + inputs.lengths,
                                                              mode="drop"))
  return cache, slots, steps_lib.as_columns(column)


def decode_chunk(graphdef, state, cache, slots: Slots, params: RowParams, inputs: DecodeInputs,
                 *, steps: int, top_n: int):
  """Up to `steps` decode steps of the slots `inputs.slot` -> (cache, slots, StepOutput
  [B, steps]). `params` is per slot."""
  steps_lib.TRACE_COUNTS["paged_decode"] += 1
  model = steps_lib.merge(graphdef, state)
  live = inputs.slot < slots.positions.shape[0]
  rows = _gather(slots.rows, inputs.slot)
  rows = dataclasses.replace(rows, done=rows.done | ~live)
  positions = _gather(slots.positions, inputs.slot)

  def model_step(rows, carry):
    cache, positions = carry
    # A done row still runs (the batch shape is fixed): its K/V go to the scratch page. Its
    # position may lie past its pages (one past max_tokens), and a table full to the bucket's
    # width would clamp that onto its last page, which may be full and shared.
    tables = jnp.where(rows.done[:, None], NULL_PAGE, inputs.block_tables)
    logits, cache = model.paged_decode(rows.last_token, positions, cache, tables)
    return logits, (cache, positions + (~rows.done).astype(jnp.int32))

  (cache, positions), rows, out = steps_lib.decode_loop(
      model_step, (cache, positions), rows, _row_params(params, inputs.slot, live), steps=steps,
      top_n=top_n)
  slots = Slots(rows=_scatter(slots.rows, inputs.slot, rows),
                positions=slots.positions.at[inputs.slot].set(positions, mode="drop"))
  return cache, slots, out


class PagedPrograms(steps_lib.ProgramTable):
  """Compiled paged programs: ("paged_prefill", (B, T, P)) and ("paged_decode", (B, P)), over
  one page pool of `num_pages` x `page_size` and `num_slots` slots; `history_len` is the width
  of ChunkInputs.history (max_seq_len). Shares the model's split state with engine.steps."""

  def __init__(self, model, graphdef, state, *, kv_cache_dtype, num_pages: int, page_size: int,
               num_slots: int, history_len: int, decode_steps: int, top_n: int):
    super().__init__()
    self.model, self.graphdef, self.state = model, graphdef, state
    self.kv_cache_dtype = kv_cache_dtype
    self.num_pages, self.page_size = num_pages, page_size
    self.num_slots, self.history_len = num_slots, history_len
    self.decode_steps = decode_steps
    self.vocab_size = model.config.vocab_size
    self._prefill = jax.jit(functools.partial(prefill_chunk, graphdef, top_n=top_n),
                            donate_argnums=(1, 2))
    self._decode = jax.jit(functools.partial(decode_chunk, graphdef, steps=decode_steps,
                                             top_n=top_n), donate_argnums=(1, 2))

  def init_cache(self):
    return self.model.init_paged_cache(self.num_pages, self.page_size, self.kv_cache_dtype)

  def init_slots(self) -> Slots:
    return init_slots(self.num_slots, self.vocab_size)

  def get(self, kind: str, shape: tuple[int, ...]) -> jax.stages.Compiled:
    return self._compiled((kind, shape), lambda: self.lower(kind, shape))

  def lower(self, kind: str, shape: tuple[int, ...]) -> jax.stages.Lowered:
    cache = jax.eval_shape(self.init_cache)
    slots = jax.eval_shape(self.init_slots)
    params = _params_shape(self.num_slots, self.vocab_size)
    i32 = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32)
    if kind == "paged_prefill":
      b, t, p = shape
      inputs = ChunkInputs(tokens=i32(b, t), lengths=i32(b), start=i32(b),
                           block_tables=i32(b, p), slot=i32(b),
                           history=i32(b, self.history_len), num_prompt=i32(b))
      return self._prefill.lower(self.state, cache, slots, params, inputs)
    b, p = shape
    return self._decode.lower(self.state, cache, slots, params,
                              DecodeInputs(slot=i32(b), block_tables=i32(b, p)))


def _params_shape(num_slots: int, vocab_size: int) -> RowParams:
  from engine import batch as batching  # engine.batch imports engine.steps: import late
  return steps_lib.shapes(batching.row_params([], num_slots, vocab_size))
