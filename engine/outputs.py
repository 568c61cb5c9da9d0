"""What `LLM.generate` returns: one RequestOutput per prompt, in the order given."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
  """Wall-clock times (time.perf_counter seconds) and the rates derived from them.

  `time_to_first_token_s` runs from the `generate` call (so it includes waiting for earlier
  batches when there are more prompts than `max_batch_size`) to the first token on the host.
  `decode_tokens_per_s` is this request's tokens after the first over the time after the first.
  """
  arrival_time: float
  first_token_time: float | None = None
  finish_time: float | None = None
  num_prompt_tokens: int = 0
  num_generated_tokens: int = 0
  batch_size: int = 0  # rows of the batch bucket this request ran in (v2: its largest)

  @property
  def time_to_first_token_s(self) -> float | None:
    if self.first_token_time is None:
      return None
    return self.first_token_time - self.arrival_time

  @property
  def decode_time_s(self) -> float | None:
    if self.first_token_time is None or self.finish_time is None:
      return None
    return self.finish_time - self.first_token_time

  @property
  def decode_tokens_per_s(self) -> float | None:
    t = self.decode_time_s
    if not t or self.num_generated_tokens < 2:
      return None
    return (self.num_generated_tokens - 1) / t

  def as_dict(self) -> dict:
    return {"time_to_first_token_s": self.time_to_first_token_s,
            "decode_time_s": self.decode_time_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "batch_size": self.batch_size}


@dataclasses.dataclass
class RequestOutput:
  """One request's result.

  finish_reason: "stop" (EOS, a stop token, or a stop string), "length" (max_tokens reached, or
  the max_seq_len budget of prompt + output), "abort" (`LLM.abort`: text and token_ids hold what
  was generated until then) or "error" (the request was refused; `error` says why, and
  text/token_ids are empty). stop_reason: the stop string or stop token id that ended the
  request, None for EOS or length. token_ids include a stop token that ended the request; text
  excludes it and excludes a matched stop string. logprobs (when asked): one dict per generated
  token {token_id: logprob} holding the top-N and the sampled token. num_cached_tokens: prompt
  tokens whose K/V the prefix cache already held (engine v2; always 0 on v1). request_id: the id
  `LLM.add_request` returned (engine v2 numbers every request; None on v1).
  """
  index: int
  prompt: str | None
  prompt_token_ids: list[int]
  text: str = ""
  token_ids: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  stop_reason: str | int | None = None
  logprobs: list[dict[int, float]] | None = None
  cumulative_logprob: float | None = None
  error: str | None = None
  metrics: RequestMetrics | None = None
  num_cached_tokens: int = 0
  request_id: int | None = None

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["metrics"] = self.metrics.as_dict() if self.metrics else None
    if self.logprobs is not None:
      d["logprobs"] = [{str(k): v for k, v in step.items()} for step in self.logprobs]
    return d
