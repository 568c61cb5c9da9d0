"""Host side of a batch: requests in, the numpy inputs of the device programs out."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.detok import Detokenizer
from engine.outputs import RequestMetrics, RequestOutput
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
  p = dict(temperature=f32(0), top_k=np.zeros((batch,), np.int32), top_p=f32(1), min_p=f32(0),
           repetition_penalty=f32(1), presence_penalty=f32(0), frequency_penalty=f32(0),
           key_data=np.zeros((batch, 2), np.uint32), stop_mask=np.zeros((batch, vocab_size), bool),
           max_tokens=np.ones((batch,), np.int32), want_logprobs=np.zeros((batch,), bool),
           active=np.zeros((batch,), bool))
  for i, r in enumerate(reqs):
    sp = r.params
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty"):
      p[name][i] = getattr(sp, name)
    p["key_data"][i] = r.key_data
    p["stop_mask"][i, list(r.stop_ids)] = True
    p["max_tokens"][i] = r.max_tokens
    p["want_logprobs"][i] = sp.logprobs is not None
    p["active"][i] = True
  return RowParams(**p)


def new_request(index: int, prompt, params: SamplingParams, *, arrival: float) -> Request:
  text = prompt if isinstance(prompt, str) else None
  out = RequestOutput(index=index, prompt=text, prompt_token_ids=[],
                      metrics=RequestMetrics(arrival_time=arrival))
  return Request(output=out, params=params)


def fail(req: Request, message: str) -> None:
  req.output.finish_reason = "error"
  req.output.error = message
