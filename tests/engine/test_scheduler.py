"""The continuous-batching scheduler against a simulated device (no jax, so hypothesis can run
many schedules): the simulation does what engine.paged_steps does to the pages and slots, and
checks every K/V it reads is its own sequence's, at every position, under the engine's pipelining
(outputs read one step after dispatch)."""

import collections
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.paging import BlockManager
from engine.scheduler import FINISHED, RUNNING, Scheduler, Sequence

STOP = 0  # the simulated EOS
VOCAB = 24


def token(seq_id, j):
  """The j-th token a sequence samples: a function of (its key, its draw counter), as the
  engine's counter-based sampling is; STOP about one time in VOCAB."""
  return hash((seq_id, j, 7)) % VOCAB  # ints only: the same in every process (no hash seed)


def kv(tokens, position):
  """What the K/V at `position` depends on: every token up to it."""
  return hash(tuple(tokens[:position + 1]))


@dataclasses.dataclass
class SlotState:
  seq_id: int
  tokens: list        # prompt + sampled, as the device knows them
  num_prompt: int
  max_tokens: int
  done: bool = False

  @property
  def num_generated(self):
    return len(self.tokens) - self.num_prompt


class FakeDevice:
  """Pages of K/V fingerprints and per-slot state, updated as the paged programs do."""

  def __init__(self, bm: BlockManager, decode_steps: int):
    self.bm, self.steps, self.page_size = bm, decode_steps, bm.page_size
    self.pages = collections.defaultdict(dict)  # page -> {offset: fingerprint}
    self.slots = {}

  def _write(self, table, position, value):
    page = table[position // self.page_size]
    assert self.bm.refcount(page) == 1, f"write into shared page {page}"
    self.pages[page][position % self.page_size] = value

  def _attend(self, table, tokens, upto):
    for q in range(upto):
      page = table[q // self.page_size]
      assert self.pages[page].get(q % self.page_size) == kv(tokens, q), f"bad K/V at {q}"

  def _sample(self, state: SlotState):
    tok = token(state.seq_id, state.num_generated)
    state.tokens.append(tok)
    state.done = tok == STOP or state.num_generated >= state.max_tokens
    return tok

  def prefill(self, chunk):
    seq = chunk.seq
    end = chunk.start + chunk.length
    table = self.bm.block_table(seq.seq_id)[:-(-end // self.page_size)]
    for q in range(chunk.start, end):
      self._write(table, q, kv(seq.history, q))
    self._attend(table, seq.history, end)
    if not chunk.final:
      return None
    state = SlotState(seq.seq_id, list(seq.history), len(seq.prompt_ids), seq.max_tokens)
    self.slots[seq.slot] = state
    return [self._sample(state)]

  def decode(self, seq):
    state = self.slots[seq.slot]
    assert state.seq_id == seq.seq_id
    table = self.bm.block_table(seq.seq_id)[:-(-seq.kv_bound // self.page_size)]
    out = []
    for _ in range(self.steps):
      if state.done:
        break
      position = len(state.tokens) - 1  # feed the last token
      assert position < len(table) * self.page_size, "decode past the lookahead"
      self._write(table, position, kv(state.tokens, position))
      self._attend(table, state.tokens, position + 1)
      out.append(self._sample(state))
    return out


class Harness:
  """The engine's loop (LLM._step) over the scheduler and the fake device."""

  def __init__(self, *, num_pages, page_size, max_num_seqs, budget, decode_steps, caching):
    self.bm = BlockManager(num_pages, page_size, enable_prefix_caching=caching)
    self.sched = Scheduler(self.bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                           decode_steps=decode_steps)
    self.device = FakeDevice(self.bm, decode_steps)
    self.in_flight = collections.deque()
    self.seqs, self.ended = {}, {}

  def add(self, prompt, max_tokens, host_stop_at=None):
    seq_id = len(self.seqs)
    capacity = self.sched.capacity_tokens
    prompt = prompt[:capacity]
    seq = Sequence(seq_id, prompt, [], min(max_tokens, capacity + 1 - len(prompt)))
    seq.host_stop_at = host_stop_at  # a stop string: the host ends it, the device does not know
    self.sched.add(seq)
    self.seqs[seq_id] = seq

  def abort(self, seq_id):
    seq = self.seqs[seq_id]
    if seq.status != FINISHED:
      self.sched.finish(seq)
      self.ended[seq_id] = "abort"

  def dispatch(self, plan):
    prefill = [(c.seq, self.device.prefill(c)) for c in plan.chunks]
    decode = [(seq, self.device.decode(seq)) for seq in plan.decode]
    self.in_flight.append([(s, t) for s, t in prefill if t is not None] + decode)

  def step(self):
    plan = self.sched.schedule()
    if plan:
      self.dispatch(plan)
    if self.in_flight and (len(self.in_flight) > 1 or not plan):
      self._read(self.in_flight.popleft())
    elif self.sched.has_unfinished():
      assert plan, "no progress"
    self.sched.check_invariants()

  def _read(self, rows):
    for seq, tokens in rows:
      if seq.status == FINISHED:
        continue
      reason = None
      for tok in tokens:
        seq.output_ids.append(tok)
        if tok == STOP:
          reason = "stop"
        elif len(seq.output_ids) >= seq.max_tokens:
          reason = "length"
        elif seq.host_stop_at == len(seq.output_ids):
          reason = "host_stop"
        if reason:
          break
      self.sched.on_read(seq)
      if reason:
        self.sched.finish(seq)
        self.ended[seq.seq_id] = reason

  def run_to_end(self, max_steps=10_000):
    for _ in range(max_steps):
      if not self.sched.has_unfinished() and not self.in_flight:
        return
      self.step()
    raise AssertionError("did not finish")

  def check_outputs(self):
    assert set(self.ended) == set(self.seqs), "every request ends"
    for seq_id, seq in self.seqs.items():
      want = [token(seq_id, j) for j in range(len(seq.output_ids))]
      assert seq.output_ids == want, seq_id
      reason = self.ended[seq_id]
      if reason == "stop":
        assert seq.output_ids[-1] == STOP and STOP not in seq.output_ids[:-1]
      elif reason == "length":
        assert len(seq.output_ids) == seq.max_tokens and STOP not in seq.output_ids
      elif reason == "host_stop":
        assert len(seq.output_ids) == seq.host_stop_at
    assert self.bm.num_used_pages == 0
    assert self.bm.num_free_pages == self.bm.num_pages - 1
    assert not self.sched.running and not self.sched.waiting


PREFIXES = [list(range(1, 30)), [5] * 30, [7, 3] * 15]


@st.composite
def workloads(draw):
  config = dict(page_size=draw(st.sampled_from([1, 2, 4])),
                max_num_seqs=draw(st.integers(1, 4)), budget=draw(st.integers(1, 24)),
                decode_steps=draw(st.integers(1, 4)), caching=draw(st.booleans()))
  config["num_pages"] = draw(st.integers(2, 40))
  events = draw(st.lists(st.one_of(
      st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 20), st.integers(1, 20),
                st.integers(1, 30), st.one_of(st.none(), st.integers(1, 10))),
      st.tuples(st.just("abort"), st.integers(0, 30)),
      st.tuples(st.just("step"), st.integers(1, 3))), max_size=40))
  return config, events


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_schedules_finish_everything_with_correct_kv(workload):
  config, events = workload
  h = Harness(**config)
  for event in events:
    if event[0] == "add":
      _, prefix, shared, own, max_tokens, host_stop_at = event
      prompt = PREFIXES[prefix][:shared] + [100 + len(h.seqs)] * own
      h.add(prompt, max_tokens, host_stop_at)
    elif event[0] == "abort" and h.seqs:
      h.abort(event[1] % len(h.seqs))
    else:
      for _ in range(event[1]):
        h.step()
  h.run_to_end()
  h.check_outputs()


def _harness(**overrides):
  config = dict(num_pages=11, page_size=2, max_num_seqs=4, budget=8, decode_steps=4,
                caching=True)
  return Harness(**{**config, **overrides})


def test_a_short_pool_preempts_the_newest_and_recomputes():
  h = _harness()
  for i in range(6):
    h.add([50 + i] * 5, 12)
  h.run_to_end()
  h.check_outputs()
  assert h.sched.num_preemptions > 0


def test_long_prompts_are_chunked_under_the_budget():
  h = _harness(num_pages=64, budget=8)
  h.add(list(range(1, 31)), 3)
  h.add(list(range(31, 40)), 3)
  chunks = []
  while h.sched.has_unfinished() or h.in_flight:
    plan = h.sched.schedule()
    assert sum(c.length for c in plan.chunks) <= 8
    chunks += [(c.seq.seq_id, c.start, c.length) for c in plan.chunks]
    h.dispatch(plan)
    h._read(h.in_flight.popleft())
  assert [c for c in chunks if c[0] == 0] == [(0, 0, 8), (0, 8, 8), (0, 16, 8), (0, 24, 6)]
  assert (1, 0, 2) in chunks  # the second prompt fills the budget's rest, beside the first
  h.check_outputs()


def test_prefix_cache_serves_full_pages_of_a_shared_prompt():
  h = _harness(num_pages=64, page_size=4)
  h.add(list(range(1, 20)), 4)
  h.run_to_end()
  h.add(list(range(1, 20)) + [77], 4)  # the same 19 tokens, then its own
  h.add(list(range(1, 20)), 4)         # the same prompt: its last page is recomputed
  h.run_to_end()
  assert [s.num_cached_tokens for s in h.seqs.values()] == [0, 16, 16]
  h.check_outputs()


def test_no_prefix_cache_when_off():
  h = _harness(num_pages=64, page_size=4, caching=False)
  for _ in range(2):
    h.add(list(range(1, 20)), 4)
    h.run_to_end()
  assert [s.num_cached_tokens for s in h.seqs.values()] == [0, 0]


def test_abort_of_waiting_and_running_frees_pages():
  h = _harness(max_num_seqs=1)
  h.add([9] * 6, 30)
  h.add([8] * 6, 30)
  assert STOP not in [token(0, j) for j in range(8)]  # still running after two steps
  h.step()
  h.step()
  running, waiting = h.seqs[0], h.seqs[1]
  assert running.status == RUNNING and waiting in h.sched.waiting
  assert h.bm.num_used_pages > 0
  h.abort(1)
  h.abort(0)
  h.sched.check_invariants()
  assert h.bm.num_used_pages == 0 and not h.sched.has_unfinished()
  h.run_to_end()  # the step in flight is read and ignored


def test_a_sequence_beyond_the_pool_is_refused():
  bm = BlockManager(5, 4)
  sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8, decode_steps=2)
  with pytest.raises(ValueError, match="page pool"):
    sched.add(Sequence(0, [1] * 17, [], 1))
  sched.add(Sequence(1, [1] * 16, [], 1))  # 16 positions: exactly the pool
