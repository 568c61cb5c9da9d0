"""The two device programs, `prefill` and `decode_chunk`, and their compiled-program table.

Both are small pure functions over `(graphdef, state, cache, inputs)`: the model is split once
(`nnx.split`) and merged inside the trace, and the KV cache is donated, so every call updates it
in place (tests/engine/test_donation.py reads the aliasing off the compiled HLO and the buffer
pointers). `decode_chunk` runs up to `steps` decode steps in one `lax.while_loop`, sampling and
stop checks included, and leaves early once every row is done: one dispatch and one host read per
chunk, not per token. The sampling step, the decode loop and the compiled-program table are shared
with the paged programs of engine v2 (`engine.paged_steps`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine import sampling
from engine.sampling import RowParams, RowState, StepOutput

# How many times each step function has been traced: one trace per compiled program.
TRACE_COUNTS: collections.Counter = collections.Counter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillInputs:
  tokens: jax.Array   # i32 [B, T]; right-padded prompts
  lengths: jax.Array  # i32 [B]; prompt lengths (1 for rows that only pad the batch)


def prefill(graphdef, state, cache, inputs: PrefillInputs, params: RowParams, *, top_n: int):
  """Prompt -> (cache, row state, the first sampled token as a one-column StepOutput)."""
  TRACE_COUNTS["prefill"] += 1
  model = merge(graphdef, state)
  logits, cache = model.prefill(inputs.tokens, inputs.lengths, cache)
  rows = sampling.initial_state(inputs.tokens, inputs.lengths, logits.shape[-1])
  rows = dataclasses.replace(rows, done=~params.active)
  rows, column = sample_step(logits, params, rows, top_n)
  return cache, rows, as_columns(column)


def decode_chunk(graphdef, state, cache, rows: RowState, params: RowParams, host_stop: jax.Array,
                 *, steps: int, top_n: int):
  """Up to `steps` decode steps; `host_stop` bool [B] ends rows the host stopped (stop strings)."""
  TRACE_COUNTS["decode"] += 1
  model = merge(graphdef, state)
  rows = dataclasses.replace(rows, done=rows.done | host_stop)

  def model_step(rows, cache):
    logits, new_cache = model.decode(rows.last_token, cache)
    # A finished row keeps decoding padding (the batch shape is fixed) but must not advance:
    # its length stays put, so its writes land on one slot past its text, inside the cache.
    return logits, dataclasses.replace(
        new_cache, lengths=jnp.where(rows.done, cache.lengths, new_cache.lengths))

  return decode_loop(model_step, cache, rows, params, steps=steps, top_n=top_n)


# ---------------------------------------------------------------- shared by engine.paged_steps


def sample_step(logits: jax.Array, params: RowParams, rows: RowState, top_n: int
                ) -> tuple[RowState, StepOutput]:
  """Sample one token per row from logits [B, V], with logprobs for the live rows that ask, and
  advance the rows. -> (rows, a StepOutput of one step: fields [B] / [B, top_n])."""
  tokens = sampling.sample(logits, params, rows)
  lp, top_ids, top_lp = sampling.logprobs(logits, tokens, params.want_logprobs & ~rows.done,
                                          top_n)
  rows, emitted = sampling.advance(rows, tokens, params)
  return rows, StepOutput(emitted, lp, top_ids, top_lp)


def as_columns(column: StepOutput) -> StepOutput:
  """One step's StepOutput as a one-column chunk."""
  return jax.tree.map(lambda x: x[:, None], column)


def decode_loop(model_step, model_carry, rows: RowState, params: RowParams, *, steps: int,
                top_n: int):
  """Up to `steps` decode steps in one lax.while_loop, leaving early once every row is done.

  model_step(rows, model_carry) -> (logits f32 [B, V], model_carry) feeds rows.last_token; it
  sees the rows before this step's token, so it can hold back the rows already done.
  -> (model_carry, rows, StepOutput [B, steps]: PAD where a row was done)."""
  b = rows.done.shape[0]
  out = StepOutput(jnp.full((b, steps), sampling.PAD, jnp.int32), jnp.zeros((b, steps)),
                   jnp.zeros((b, steps, top_n), jnp.int32), jnp.zeros((b, steps, top_n)))

  def not_finished(carry):
    i, _, rows, _ = carry
    return (i < steps) & ~jnp.all(rows.done)

  def step(carry):
    i, model_carry, rows, out = carry
    logits, model_carry = model_step(rows, model_carry)
    rows, column = sample_step(logits, params, rows, top_n)
    out = jax.tree.map(lambda o, c: o.at[:, i].set(c), out, column)
    return i + 1, model_carry, rows, out

  _, model_carry, rows, out = jax.lax.while_loop(not_finished, step,
                                                 (jnp.int32(0), model_carry, rows, out))
  return model_carry, rows, out


def split(model):
  """(graphdef, state) for the step functions: the graphdef is (nnx graphdef, treedef of the
  state) and the state a flat list of arrays. Flattening the nnx.State pytree (Variable nodes) on
  every call cost ~8 ms of host time per dispatch for SmolLM2."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  return (graphdef, treedef), leaves


def merge(graphdef, state):
  """The model back from `split`'s (graphdef, state), inside a trace."""
  nnx_graphdef, treedef = graphdef
  return nnx.merge(nnx_graphdef, jax.tree.unflatten(treedef, state))


def shapes(tree):
  """ShapeDtypeStructs of a pytree of arrays (host or device)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class ProgramTable:
  """Executables compiled ahead of time on first use, keyed by (kind, bucket shape)."""

  def __init__(self):
    self.compiled: dict = {}
    self._lock = threading.Lock()

  def _compiled(self, key, lower) -> jax.stages.Compiled:
    """The executable for `key`; `lower()` gives its jax.stages.Lowered when it is new."""
    with self._lock:
      if key not in self.compiled:
        self.compiled[key] = lower().compile()
      return self.compiled[key]


class Programs(ProgramTable):
  """Compiled prefill / decode programs, one per bucket, compiled ahead of time on first use.

  The graphdef is closed over (it is static, and need not be hashable); state, cache and inputs
  are arguments; the state travels as a flat list of arrays (`split`).
  `compiled` maps ("prefill", (B, T, S)) / ("decode", (B, S)) to an executable.
  """

  def __init__(self, model, *, kv_cache_dtype, decode_steps: int, top_n: int):
    super().__init__()
    self.model = model
    self.graphdef, self.state = split(model)
    self.kv_cache_dtype = kv_cache_dtype
    self.decode_steps = decode_steps
    # keep_unused: prefill never reads cache.lengths, and a pruned input could not be aliased.
    self._prefill = jax.jit(functools.partial(prefill, self.graphdef, top_n=top_n),
                            donate_argnums=(1,), keep_unused=True)
    self._decode = jax.jit(functools.partial(decode_chunk, self.graphdef, steps=decode_steps,
                                             top_n=top_n), donate_argnums=(1, 2))

  def cache_shape(self, batch: int, seq_len: int):
    return jax.eval_shape(lambda: self.model.init_cache(batch, seq_len, self.kv_cache_dtype))

  def get(self, kind: str, shape: tuple[int, ...], example_inputs) -> jax.stages.Compiled:
    """The executable for one bucket; `example_inputs()` gives host arrays of its input shapes."""
    return self._compiled((kind, shape), lambda: self.lower(kind, shape, example_inputs()))

  def lower(self, kind: str, shape: tuple[int, ...], inputs) -> jax.stages.Lowered:
    b, s = shape[0], shape[-1]
    cache = self.cache_shape(b, s)
    if kind == "prefill":
      return self._prefill.lower(self.state, cache, *shapes(inputs))
    rows = jax.eval_shape(functools.partial(sampling.initial_state,
                                            vocab_size=self.model.config.vocab_size),
                          jax.ShapeDtypeStruct((b, 1), jnp.int32),
                          jax.ShapeDtypeStruct((b,), jnp.int32))
    return self._decode.lower(self.state, cache, rows, *shapes(inputs))
