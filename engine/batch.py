"""Host side of a batch: requests in, the numpy inputs of the device programs out."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from engine.detok import Detokenizer
from engine.outputs import RequestMetrics, RequestOutput
from engine.paged_steps import NULL_PAGE, ChunkInputs, DecodeInputs
from engine.params import SamplingParams
from engine.sampling import RowParams
from engine.steps import PrefillInputs

_U32 = 0xFFFFFFFF


@dataclasses.dataclass
class Request:
  """One prompt's journey; `output` is what the caller gets back."""
  output: RequestOutput
  params: SamplingParams
  max_tokens: int = 0        # params.max_tokens clamped to the max_seq_len budget
  key_data: tuple[int, int] = (0, 0)
  stop_ids: frozenset = frozenset()
  detok: Detokenizer | None = None
  # engine v2
  seq: Any = None          # its engine.scheduler.Sequence
  scripted: bool = False   # added by LLM.add_request: its output comes back from LLM.step
  stream: bool = False     # text deltas wanted, collected in `deltas`
  deltas: collections.deque = dataclasses.field(default_factory=collections.deque)

  @property
  def prompt_ids(self) -> list[int]:
    return self.output.prompt_token_ids

  @property
  def finished(self) -> bool:
    return self.output.finish_reason is not None


def seed_key(seed: int) -> tuple[int, int]:
  """The threefry key data of a seeded request: the 64-bit seed as (high, low) words."""
  return (seed >> 32) & _U32, seed & _U32


def prefill_inputs(reqs: list[Request], batch: int, prompt_len: int) -> PrefillInputs:
  tokens = np.zeros((batch, prompt_len), np.int32)
  lengths = np.ones((batch,), np.int32)  # rows that only pad the batch hold one dummy token
  for i, r in enumerate(reqs):
    tokens[i, :len(r.prompt_ids)] = r.prompt_ids
    lengths[i] = len(r.prompt_ids)
  return PrefillInputs(tokens, lengths)


def row_params(reqs: list[Request], batch: int, vocab_size: int) -> RowParams:
  f32 = lambda v: np.full((batch,), v, np.float32)
  p = RowParams(temperature=f32(0), top_k=np.zeros((batch,), np.int32), top_p=f32(1),
                min_p=f32(0), repetition_penalty=f32(1), presence_penalty=f32(0),
                frequency_penalty=f32(0), key_data=np.zeros((batch, 2), np.uint32),
                stop_mask=np.zeros((batch, vocab_size), bool),
                max_tokens=np.ones((batch,), np.int32), want_logprobs=np.zeros((batch,), bool),
                active=np.zeros((batch,), bool))
  for i, r in enumerate(reqs):
    set_row(p, i, r)
  return p


def set_row(p: RowParams, i: int, r: Request) -> None:
  """Row i of host (numpy) RowParams becomes request r's."""
  sp = r.params
  for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty"):
    getattr(p, name)[i] = getattr(sp, name)
  p.key_data[i] = r.key_data
  p.stop_mask[i] = False
  p.stop_mask[i, list(r.stop_ids)] = True
  p.max_tokens[i] = r.max_tokens
  p.want_logprobs[i] = sp.logprobs is not None
  p.active[i] = True


def chunk_inputs(chunks, tables: list[list[int]], shape: tuple[int, int, int], num_slots: int,
                 history_len: int) -> ChunkInputs:
  """Prefill chunks (engine.scheduler.Chunk) and their rows' block tables -> ChunkInputs of
  bucket shape (B, T, P). A chunk that ends its history names its slot and its history."""
  b, t, p = shape
  inputs = ChunkInputs(tokens=np.zeros((b, t), np.int32), lengths=np.zeros((b,), np.int32),
                       start=np.zeros((b,), np.int32),
                       block_tables=np.full((b, p), NULL_PAGE, np.int32),
                       slot=np.full((b,), num_slots, np.int32),
                       history=np.full((b, history_len), -1, np.int32),
                       num_prompt=np.zeros((b,), np.int32))
  for i, (c, table) in enumerate(zip(chunks, tables)):
    seq = c.seq
    inputs.tokens[i, :c.length] = seq.history[c.start:c.start + c.length]
    inputs.lengths[i], inputs.start[i] = c.length, c.start
    inputs.block_tables[i, :len(table)] = table
    if c.final:
      inputs.slot[i] = seq.slot
      inputs.history[i, :len(seq.history)] = seq.history
      inputs.num_prompt[i] = len(seq.prompt_ids)
  return inputs


def decode_inputs(seqs, tables: list[list[int]], shape: tuple[int, int],
                  num_slots: int) -> DecodeInputs:
  """Decode rows (engine.scheduler.Sequence) and their block tables -> DecodeInputs of bucket
  shape (B, P)."""
  b, p = shape
  inputs = DecodeInputs(slot=np.full((b,), num_slots, np.int32),
                        block_tables=np.full((b, p), NULL_PAGE, np.int32))
  for i, (seq, table) in enumerate(zip(seqs, tables)):
    inputs.slot[i] = seq.slot
    inputs.block_tables[i, :len(table)] = table
  return inputs


def new_request(index: int, prompt, params: SamplingParams, *, arrival: float) -> Request:
  text = prompt if isinstance(prompt, str) else None
  out = RequestOutput(index=index, prompt=text, prompt_token_ids=[],
                      metrics=RequestMetrics(arrival_time=arrival))
  return Request(output=out, params=params)


def fail(req: Request, message: str) -> None:
  req.output.finish_reason = "error"
  req.output.error = message
