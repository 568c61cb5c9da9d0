"""Fixed ladders of shapes, so a workload compiles a bounded set of programs.

Three ladders: batch rows (1, 2, 4, ... max_batch_size), padded prompt length (16, 32, ...
max_seq_len) and KV-cache length (128, 256, ... max_seq_len). The cache length is bucketed too
because a decode step reads the whole cache row: a batch of short requests must not pay for
`max_seq_len` positions. Each ladder ends at its maximum even when that is not a power of two.
`PagedBuckets` holds the ladders of engine v2 (paged cache, continuous batching).
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


def fine_ladder(stop: int) -> tuple[int, ...]:
  """1, 2, 4, then powers of two and the points halfway between them (6, 8, 12, 16, 24, ...),
  then `stop`: a batch padded to its rung wastes at most a third of its rows."""
  steps, n = [], 1
  while n < stop:
    steps += [n] + ([n * 3 // 2] if n >= 4 and n * 3 // 2 < stop else [])
    n *= 2
  return tuple(steps) + (stop,)


# What one more prefill program costs, in padded token rows: its fixed work (reading every
# weight once) against ~2 ms per token row for SmolLM2 on a 2-core CPU.
PREFILL_DISPATCH_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class PagedBuckets:
  """The ladders of engine v2: prefill rows (1, 2, 4, ... max_batch_size), decode rows (the
  finer `fine_ladder`: a decode step of many rows is compute-bound on a CPU, so padding rows
  cost), prefill chunk length (16, 32, ... the per-step token budget) and block-table width in
  pages (128 tokens' worth, then doubling, to max_seq_len's). The table width is bucketed for
  the same reason as v1's cache length: attention reads every page the table names."""
  batch: tuple[int, ...]
  decode_batch: tuple[int, ...]
  chunk: tuple[int, ...]
  pages: tuple[int, ...]
  page_size: int

  @classmethod
  def for_limits(cls, max_batch_size: int, max_seq_len: int, page_size: int,
                 max_num_batched_tokens: int) -> PagedBuckets:
    max_pages = -(-max_seq_len // page_size)
    return cls(page_size=page_size, batch=ladder(1, max_batch_size),
               decode_batch=fine_ladder(max_batch_size),
               chunk=ladder(MIN_PROMPT_BUCKET, min(max_num_batched_tokens, max_seq_len)),
               pages=ladder(max(MIN_CACHE_BUCKET // page_size, 1), max_pages))

  def prefill_shape(self, num_rows: int, chunk_len: int, num_pages: int) -> tuple[int, int, int]:
    return (bucket(num_rows, self.batch), bucket(chunk_len, self.chunk),
            bucket(num_pages, self.pages))

  def decode_shape(self, num_rows: int, num_pages: int) -> tuple[int, int]:
    return bucket(num_rows, self.decode_batch), bucket(num_pages, self.pages)

  def prefill_groups(self, chunk_lens: list[int]) -> list[list[int]]:
    """Split one step's prefill chunks into programs: runs of the chunks sorted by length,
    chosen (dynamic programming over the cut points) to minimise the token rows computed,
    padding included, plus PREFILL_DISPATCH_TOKENS per program. Returns lists of indices."""
    order = sorted(range(len(chunk_lens)), key=lambda i: chunk_lens[i])
    cost = [0] * (len(order) + 1)   # cost[j]: the cheapest split of order[:j]
    start = [0] * (len(order) + 1)  # start[j]: where that split's last run starts
    for j in range(1, len(order) + 1):
      rows = bucket(chunk_lens[order[j - 1]], self.chunk)  # token rows of a run ending at j
      cost[j], start[j] = min((cost[i] + bucket(j - i, self.batch) * rows
                               + PREFILL_DISPATCH_TOKENS, i) for i in range(j))
    groups, j = [], len(order)
    while j:
      groups.append(order[start[j]:j])
      j = start[j]
    return groups[::-1]

  def programs(self) -> list[tuple[str, tuple[int, ...]]]:
    """Every program a workload can need: ("paged_prefill", (B, T, P)), ("paged_decode", (B, P))."""
    # A chunk of bucket t holds more tokens than the rung below it, so its rows' tables need
    # at least that many tokens' pages: smaller widths never occur with it.
    smallest = {t: bucket(-(-(below + 1) // self.page_size), self.pages)
                for below, t in zip((0,) + self.chunk, self.chunk)}
    out = []
    for p in self.pages:
      out += [("paged_prefill", (b, t, p)) for b in self.batch for t in self.chunk
              if smallest[t] <= p]
      out += [("paged_decode", (b, p)) for b in self.decode_batch]
    return out
