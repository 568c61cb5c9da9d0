"""Continuous batching: which sequences run in each engine step, and the pages they hold.

Host-only bookkeeping over `engine.paging.BlockManager`, no jax: the engine turns each `Plan`
into device programs (engine.paged_steps). A sequence is waiting (a FIFO queue), running (it
holds a decode slot and pages) or finished. Each `schedule()`:
  1. decode rows (running, prompt done) grow their pages to cover the next decode chunk (the
     lookahead); while the pool is short, the newest running sequence is preempted: its pages
     are freed and it goes back to the head of the queue, to recompute prompt + output so far
     when it is admitted again;
  2. sequences part-way through their prefill get their next chunk, oldest first, under the
     step's token budget (a long prompt is split over several steps);
  3. waiting sequences are admitted in order while a slot, budget and pages are left, keeping a
     reserve for the running rows' next chunks (so admission does not set up a preemption);
     the prefix cache may already hold the leading pages of a prompt, and the prefill starts
     after them;
  4. a sequence whose prefill ends in this step joins this step's decode rows if its pages can
     grow without preempting anyone (else it joins next step).
The engine dispatches a plan at once; it reads the first tokens of the prompts the plan ends in
the same step, and its decode chunk one step later, so the host's token counts lag the device's
by up to a decode chunk: `kv_bound` counts the positions every dispatched program may write (the
lookahead covers the chunk in flight too), and a preempted sequence is admitted again only once
all of its outputs have been read (its history is then known).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable

from engine.paging import BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(eq=False)
class Sequence:
  """One request as the scheduler sees it. `output_ids` is the engine's list of the tokens read
  back so far; the scheduler only reads it."""
  seq_id: Hashable
  prompt_ids: list[int]
  output_ids: list[int]
  max_tokens: int
  status: str = WAITING
  slot: int | None = None
  history: list[int] = dataclasses.field(default_factory=list)  # prompt + output when admitted
  num_computed: int = 0   # tokens of history whose prefill has been dispatched (or cached)
  kv_bound: int = 0       # at most this many positions hold K/V once dispatched programs ran
  num_inflight: int = 0   # dispatched outputs for it not read back yet
  num_cached_tokens: int | None = None  # prompt tokens the prefix cache held at first admission
  num_committed_pages: int = 0  # leading pages offered to the prefix cache

  @property
  def max_kv_tokens(self) -> int:
    """Positions holding K/V when it ends: its last token is sampled, never fed back."""
    return len(self.prompt_ids) + self.max_tokens - 1

  @property
  def in_prefill(self) -> bool:
    return self.num_computed < len(self.history)


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Prefill of seq.history[start:start + length]."""
  seq: Sequence
  start: int
  length: int

  @property
  def final(self) -> bool:
    """The chunk ends the history: the row samples its next token."""
    return self.start + self.length == len(self.seq.history)


@dataclasses.dataclass(frozen=True)
class Plan:
  chunks: list[Chunk]
  decode: list[Sequence]  # rows of this step's decode chunk

  def __bool__(self) -> bool:
    return bool(self.chunks or self.decode)


class Scheduler:
  """`max_num_seqs` decode slots; at most `max_num_batched_tokens` prefill tokens per step;
  decode chunks of `decode_steps` steps."""

  def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
               max_num_batched_tokens: int, decode_steps: int):
    self.block_manager = block_manager
    self.page_size = block_manager.page_size
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.decode_steps = decode_steps
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []  # in admission order: the last is the newest
    self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # pop() gives the lowest
    self.num_preemptions = 0

  @property
  def capacity_tokens(self) -> int:
    """Positions the pool holds (the scratch page aside): one sequence's most K/V."""
    return (self.block_manager.num_pages - 1) * self.page_size

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  def add(self, seq: Sequence) -> None:
    if seq.max_kv_tokens > self.capacity_tokens:
      raise ValueError(f"Scheduler.add: a sequence expected at most {self.capacity_tokens} "
                       f"positions of K/V (the page pool), got {seq.max_kv_tokens} "
                       f"({len(seq.prompt_ids)} prompt tokens, max_tokens {seq.max_tokens})")
    self.waiting.append(seq)

  # ---------------------------------------------------------------- one step

  def schedule(self) -> Plan:
    decode = self._grow_decode_rows()
    chunks = self._continue_prefills()
    chunks += self._admit(self.max_num_batched_tokens - sum(c.length for c in chunks))
    decode += [c.seq for c in chunks if c.final and self._can_join_decode(c.seq)]
    self._apply(chunks, decode)
    return Plan(chunks, decode)

  def _grow_decode_rows(self) -> list[Sequence]:
    rows = []
    for seq in list(self.running):  # oldest first; preemption takes the newest
      if seq.status != RUNNING or seq.in_prefill or seq.kv_bound >= seq.max_kv_tokens:
        continue  # preempted just now, still in prefill, or done on the device already
      if self._reserve(seq, min(seq.kv_bound + self.decode_steps, seq.max_kv_tokens)):
        rows.append(seq)
    return rows

  def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
    """Grow seq's pages to cover num_tokens positions, preempting the newest running sequences
    while the pool is short. False when seq itself had to go."""
    while not self.block_manager.grow(seq.seq_id, num_tokens):
      victim = self.running[-1]
      self._preempt(victim)
      if victim is seq:
        return False
    return True

  def _continue_prefills(self) -> list[Chunk]:
    chunks, budget = [], self.max_num_batched_tokens
    for seq in self.running:
      if seq.in_prefill and budget > 0:
        length = min(len(seq.history) - seq.num_computed, budget)
        chunks.append(Chunk(seq, seq.num_computed, length))
        budget -= length
    return chunks

  def _admit(self, budget: int) -> list[Chunk]:
    chunks = []
    while self.waiting and self._free_slots and budget > 0:
      seq = self.waiting[0]
      if seq.num_inflight:
        break  # preempted with outputs still in flight: its history is not known yet
      history = seq.prompt_ids + seq.output_ids
      if not self._fits(len(history)):
        break
      cached = self.block_manager.allocate(seq.seq_id, history)
      if cached is None:
        break
      self.waiting.popleft()
      self._start(seq, history, cached)
      length = min(len(history) - cached, budget)
      chunks.append(Chunk(seq, cached, length))
      budget -= length
    return chunks

  def _fits(self, num_tokens: int) -> bool:
    """Pages for num_tokens (ignoring prefix hits) beside a reserve for the running rows' next
    two chunks: the one in flight and the next."""
    reserve = 0
    for seq in self.running:
      want = min(max(seq.kv_bound, len(seq.history)) + 2 * self.decode_steps, seq.max_kv_tokens)
      held = self.block_manager.num_tokens_capacity(seq.seq_id) // self.page_size
      reserve += max(_cdiv(want, self.page_size) - held, 0)
    return _cdiv(num_tokens, self.page_size) + reserve <= self.block_manager.num_free_pages

  def _start(self, seq: Sequence, history: list[int], num_cached: int) -> None:
    seq.status, seq.slot, seq.history = RUNNING, self._free_slots.pop(), history
    seq.num_computed = seq.kv_bound = num_cached
    seq.num_committed_pages = num_cached // self.page_size
    if seq.num_cached_tokens is None:
      seq.num_cached_tokens = min(num_cached, len(seq.prompt_ids))
    self.running.append(seq)

  def _can_join_decode(self, seq: Sequence) -> bool:
    num_tokens = min(len(seq.history) + self.decode_steps, seq.max_kv_tokens)
    return len(seq.history) < seq.max_kv_tokens and self.block_manager.grow(seq.seq_id,
                                                                            num_tokens)

  def _apply(self, chunks: list[Chunk], decode: list[Sequence]) -> None:
    """The plan is dispatched: advance the counts; offer the prompt pages it fills to the prefix
    cache (a later program that hits them runs after this one)."""
    for c in chunks:
      seq = c.seq
      seq.num_computed += c.length
      if self._has_new_full_pages(seq, seq.num_computed):
        self._commit(seq, seq.history[:seq.num_computed])
      if c.final:
        seq.kv_bound = len(seq.history)
        seq.num_inflight += 1
    for seq in decode:
      seq.kv_bound = min(seq.kv_bound + self.decode_steps, seq.max_kv_tokens)
      seq.num_inflight += 1

  def _has_new_full_pages(self, seq: Sequence, num_written: int) -> bool:
    return (self.block_manager.enable_prefix_caching
            and num_written // self.page_size > seq.num_committed_pages)

  def _commit(self, seq: Sequence, written: list[int]) -> None:
    self.block_manager.commit(seq.seq_id, written)
    seq.num_committed_pages = len(written) // self.page_size

  # ---------------------------------------------------------------- outputs and ends

  def on_read(self, seq: Sequence) -> None:
    """One dispatched output of seq has been read back and seq.output_ids updated: the K/V of
    every token but the last are written, so their full pages can be cached."""
    seq.num_inflight -= 1
    if seq.status == RUNNING and not seq.in_prefill:
      num_written = len(seq.prompt_ids) + len(seq.output_ids) - 1
      if self._has_new_full_pages(seq, num_written):  # checked first: the list costs O(length)
        self._commit(seq, (seq.prompt_ids + seq.output_ids)[:num_written])

  def finish(self, seq: Sequence) -> None:
    """seq ended (finished, aborted or dropped): free its slot and pages, wherever it is."""
    if seq.status == RUNNING:
      self._release(seq)
    elif seq.status == WAITING:
      self.waiting.remove(seq)
    seq.status = FINISHED

  def _preempt(self, seq: Sequence) -> None:
    self._release(seq)
    seq.status, seq.history = WAITING, []
    seq.num_computed = seq.kv_bound = seq.num_committed_pages = 0
    self.waiting.appendleft(seq)  # victims go newest first, so the queue keeps their age order
    self.num_preemptions += 1

  def _release(self, seq: Sequence) -> None:
    self.block_manager.free(seq.seq_id)
    self.running.remove(seq)
    self._free_slots.append(seq.slot)
    self._free_slots.sort(reverse=True)
    seq.slot = None

  # ---------------------------------------------------------------- audit

  def check_invariants(self) -> None:
    """Raise AssertionError on broken bookkeeping (tests): slots, queues, page coverage."""
    bm = self.block_manager
    bm.check_invariants()
    slots = [s.slot for s in self.running]
    assert len(set(slots)) == len(slots), f"a slot held twice: {slots}"
    assert set(slots).isdisjoint(self._free_slots), "a held slot is free"
    assert len(slots) + len(self._free_slots) == self.max_num_seqs, "a slot leaked"
    for seq in self.running:
      assert seq.status == RUNNING and bm.has(seq.seq_id), seq.seq_id
      assert bm.num_tokens_capacity(seq.seq_id) >= max(seq.kv_bound, len(seq.history)), seq
    for seq in self.waiting:
      assert seq.status == WAITING and not bm.has(seq.seq_id) and seq.slot is None, seq.seq_id
    assert len({id(s) for s in self.waiting} | {id(s) for s in self.running}) == (
        len(self.waiting) + len(self.running)), "a sequence queued twice"

