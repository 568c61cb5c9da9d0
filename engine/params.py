"""Per-request sampling parameters, with vLLM's names and semantics, checked when they are made."""

from __future__ import annotations

import dataclasses
import math
import numbers

# The most top-N logprobs a request may ask for (vLLM's default `max_logprobs`). Static: the decode
# program always has room for this many, whatever the batch asks.
MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
  """How to sample one request.

  Order on device, per row (vLLM v1): repetition penalty over prompt + output tokens (positive
  logits divided, negative multiplied); presence and frequency penalties over output tokens;
  temperature (0 = greedy: argmax of the penalised logits); min_p; top_k (0 or -1 = off); top_p.
  `logprobs=N` returns, for each generated token, the log-probability of the sampled token and of
  the N most likely ones, from the model's raw distribution (before penalties and temperature,
  vLLM v1's default). `stop` strings are matched on the detokenized text and cut from it;
  `stop_token_ids` (and EOS unless `ignore_eos`) end a request and stay in `token_ids`.
  """

  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  seed: int | None = None
  stop: str | list[str] | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  logprobs: int | None = None

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raise ValueError naming the first bad field (also run again for every request)."""
    _int_field("max_tokens", self.max_tokens, minimum=1)
    _float_field("temperature", self.temperature, "a float >= 0", lambda x: x >= 0)
    _int_field("top_k", self.top_k, minimum=-1)
    _float_field("top_p", self.top_p, "a float in (0, 1]", lambda x: 0 < x <= 1)
    _float_field("min_p", self.min_p, "a float in [0, 1]", lambda x: 0 <= x <= 1)
    _float_field("repetition_penalty", self.repetition_penalty, "a float > 0", lambda x: x > 0)
    _float_field("presence_penalty", self.presence_penalty, "a float in [-2, 2]",
                 lambda x: -2 <= x <= 2)
    _float_field("frequency_penalty", self.frequency_penalty, "a float in [-2, 2]",
                 lambda x: -2 <= x <= 2)
    if self.seed is not None:
      _int_field("seed", self.seed, minimum=0, maximum=2**64 - 1, allow="or None")
    if self.logprobs is not None:
      _int_field("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS, allow="or None")
    if not isinstance(self.ignore_eos, bool):
      raise ValueError(f"SamplingParams: `ignore_eos` expected a bool, got {self.ignore_eos!r}")
    for s in self.stop_strings:
      if not isinstance(s, str) or not s:
        raise ValueError(f"SamplingParams: `stop` expected non-empty strings, got {self.stop!r}")
    for t in self.stop_token_ids or ():
      if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError("SamplingParams: `stop_token_ids` expected non-negative ints, "
                         f"got {self.stop_token_ids!r}")

  @property
  def stop_strings(self) -> list[str]:
    if self.stop is None:
      return []
    return [self.stop] if isinstance(self.stop, str) else list(self.stop)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _int_field(name, value, *, minimum, maximum=None, allow=""):
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
  ok = ok and (maximum is None or value <= maximum)
  if not ok:
    rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"SamplingParams: `{name}` expected an int {rng}{' ' + allow if allow else ''}"
                     f", got {value!r}")


def _float_field(name, value, want, test):
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not (ok and math.isfinite(value) and test(value)):
    raise ValueError(f"SamplingParams: `{name}` expected {want}, got {value!r}")
