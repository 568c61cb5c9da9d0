"""Fixed ladders of shapes, so a workload compiles a bounded set of programs.

Three ladders: batch rows (1, 2, 4, ... max_batch_size), padded prompt length (16, 32, ...
max_seq_len) and KV-cache length (128, 256, ... max_seq_len). The cache length is bucketed too
because a decode step reads the whole cache row: a batch of short requests must not pay for
`max_seq_len` positions. Each ladder ends at its maximum even when that is not a power of two.
"""

from __future__ import annotations

import dataclasses

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 128


def ladder(start: int, stop: int) -> tuple[int, ...]:
  """Powers of two from `start` below `stop`, then `stop` itself."""
  steps, n = [], 1
  while n < stop:
    if n >= start:
      steps.append(n)
    n *= 2
  return tuple(steps) + (stop,)


def bucket(n: int, rungs: tuple[int, ...]) -> int:
  """The smallest rung >= n."""
  for r in rungs:
    if r >= n:
      return r
  raise ValueError(f"buckets: {n} exceeds the largest bucket {rungs[-1]}")


@dataclasses.dataclass(frozen=True)
class Buckets:
  batch: tuple[int, ...]
  prompt: tuple[int, ...]
  cache: tuple[int, ...]

  @classmethod
  def for_limits(cls, max_batch_size: int, max_seq_len: int) -> Buckets:
    return cls(batch=ladder(1, max_batch_size),
               prompt=ladder(MIN_PROMPT_BUCKET, max_seq_len),
               cache=ladder(MIN_CACHE_BUCKET, max_seq_len))

  def shapes(self, num_rows: int, prompt_len: int, total_len: int) -> tuple[int, int, int]:
    """(batch rows, padded prompt length, cache length) for a batch whose longest prompt is
    `prompt_len` and whose longest prompt + max_tokens is `total_len`."""
    t = bucket(prompt_len, self.prompt)
    return bucket(num_rows, self.batch), t, max(t, bucket(total_len, self.cache))

  def programs(self) -> list[tuple[str, tuple[int, ...]]]:
    """Every program a workload can need: ("prefill", (B, T, S)) for T <= S, ("decode", (B, S))."""
    out = []
    for b in self.batch:
      for s in self.cache:
        # Cache lengths are chosen >= the prompt bucket's own cache bucket: other pairs never occur.
        out += [("prefill", (b, t, s)) for t in self.prompt if bucket(t, self.cache) <= s]
        out.append(("decode", (b, s)))
    return out

