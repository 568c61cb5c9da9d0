"""BlockManager: accounting, prefix hits, collisions, LRU eviction, and random operation sequences
checked against a shadow KV cache (each slot records the token prefix its K/V was computed from)."""

import pickle
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine import paging
from engine.paging import BlockManager


def state(bm):
  """Everything the manager holds, to check that a refused call changed nothing (pickled: a
  deep copy that is fast enough to take before every call of the random tests)."""
  return pickle.dumps(vars(bm))


def committed(bm, seq_id, token_ids, num_tokens=None):
  """Allocate a sequence and commit its whole prompt, as after its prefill."""
  cached = bm.allocate(seq_id, token_ids, num_tokens)
  bm.commit(seq_id, token_ids)
  return cached


def take_one_page(bm, seq_id):
  """Allocate a one-page sequence; its page is the one the allocator picked next."""
  assert bm.allocate(seq_id, [], bm.page_size) == 0
  return bm.block_table(seq_id)[0]


# Arguments and accounting


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_pages=1, page_size=4), "num_pages"), (dict(num_pages=8.0, page_size=4), "num_pages"),
    (dict(num_pages=True, page_size=4), "num_pages"), (dict(num_pages=8, page_size=0), "page_size"),
])
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    BlockManager(**kwargs)


def test_bad_token_counts_are_named():
  bm = BlockManager(8, 4)
  with pytest.raises(ValueError, match="`num_tokens`"):
    bm.allocate("a", [1, 2], -1)
  bm.allocate("a", [1, 2])
  with pytest.raises(ValueError, match="`num_tokens`"):
    bm.grow("a", -3)
  with pytest.raises(ValueError, match="`seq_id`"):
    bm.allocate("a", [1, 2])


def test_null_page_is_never_handed_out():
  bm = BlockManager(6, 2)
  assert (bm.num_free_pages, bm.num_used_pages) == (5, 0)
  pages = [take_one_page(bm, i) for i in range(5)]
  assert sorted(pages) == [1, 2, 3, 4, 5]
  assert bm.allocate("extra", [], 1) is None
  assert (bm.num_free_pages, bm.num_used_pages) == (0, 5)
  bm.check_invariants()


def test_allocate_rounds_up_and_free_returns_every_page():
  bm = BlockManager(10, 4)
  assert bm.allocate("a", list(range(10))) == 0          # 10 tokens: 3 pages
  assert bm.allocate("b", [1, 2, 3], num_tokens=9) == 0  # lookahead: 9 positions, 3 pages
  assert [len(bm.block_table(s)) for s in "ab"] == [3, 3]
  assert bm.num_tokens_capacity("a") == 12
  assert (bm.num_used_pages, bm.num_free_pages) == (6, 3)
  assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
  bm.check_invariants()
  bm.free("a")
  bm.free("b")
  assert (bm.num_used_pages, bm.num_free_pages) == (0, 9)
  assert not bm.has("a")
  bm.check_invariants()


def test_can_allocate_counts_free_and_evictable_pages():
  bm = BlockManager(5, 2)
  committed(bm, "a", [1, 2, 3, 4, 5])  # 3 pages, 2 of them cached full pages
  assert bm.can_allocate(2) and not bm.can_allocate(3)
  bm.free("a")
  assert bm.can_allocate(8) and not bm.can_allocate(9)  # 2 evictable + 2 free pages


def test_refused_allocate_changes_nothing():
  bm = BlockManager(6, 2)
  committed(bm, "a", [1, 2, 3, 4, 5])
  bm.free("a")                      # 2 evictable pages, 3 free ones
  committed(bm, "b", [7, 7, 7])     # takes 2 free pages
  before = state(bm)
  # Hits 2 evictable pages, then needs 3 more: the 1 free page is not enough.
  assert bm.allocate("c", [1, 2, 3, 4, 5], num_tokens=10) is None
  assert state(bm) == before
  assert bm.allocate("c", [1, 2, 3, 4, 5], num_tokens=6) == 4
  bm.check_invariants()


def test_grow_adds_pages_and_refusal_changes_nothing():
  bm = BlockManager(6, 4)
  bm.allocate("a", [1, 2, 3])
  table = bm.block_table("a")
  assert bm.grow("a", 4) and bm.block_table("a") == table  # already covered
  assert bm.grow("a", 13)
  assert bm.block_table("a")[:1] == table and bm.num_tokens_capacity("a") == 16
  before = state(bm)
  assert not bm.grow("a", 4 * 6)  # 6 pages: 4 held, 1 free
  assert state(bm) == before
  assert bm.grow("a", 2)          # never shrinks
  assert bm.num_tokens_capacity("a") == 16
  with pytest.raises(KeyError):
    bm.grow("nobody", 4)
  bm.check_invariants()


def test_free_twice_or_unknown_is_a_no_op():
  bm = BlockManager(4, 2)
  bm.allocate("a", [1, 2, 3])
  bm.free("a")
  before = state(bm)
  bm.free("a")
  bm.free("never")
  assert state(bm) == before
  bm.check_invariants()


def test_commit_beyond_capacity_raises():
  bm = BlockManager(4, 2)
  bm.allocate("a", [1, 2, 3])
  with pytest.raises(ValueError, match="`token_ids`"):
    bm.commit("a", [1, 2, 3, 4, 5])


# Prefix hits


def test_prefix_hit_shares_pages():
  bm = BlockManager(10, 4)
  prompt = list(range(10))
  assert committed(bm, "a", prompt) == 0
  assert bm.allocate("b", prompt) == 8
  a, b = bm.block_table("a"), bm.block_table("b")
  assert b[:2] == a[:2] and b[2] != a[2]
  assert [bm.refcount(p) for p in b] == [2, 2, 1]
  assert bm.num_used_pages == 4
  assert (bm.stats.prefix_queries_tokens, bm.stats.prefix_hits_tokens) == (20, 8)
  assert bm.stats.prefix_hit_rate == pytest.approx(0.4)
  bm.free("a")
  assert [bm.refcount(p) for p in b] == [1, 1, 1] and bm.num_used_pages == 3
  bm.check_invariants()


@pytest.mark.parametrize("prompt_len", range(1, 14))
def test_at_least_the_last_prompt_token_is_computed(prompt_len):
  bm = BlockManager(16, 4)
  committed(bm, "a", list(range(12)))  # 3 full cached pages
  cached = bm.allocate("b", list(range(prompt_len)))
  assert cached == min((prompt_len - 1) // 4, 3) * 4
  assert cached < prompt_len


def test_hits_stop_at_the_first_differing_page():
  bm = BlockManager(16, 2)
  committed(bm, "a", [1, 2, 3, 4, 5, 6, 7])
  assert bm.allocate("b", [1, 2, 3, 9, 5, 6, 7]) == 2
  assert bm.allocate("c", [9, 2, 3, 4, 5, 6, 7]) == 0


def test_only_committed_full_pages_hit():
  bm = BlockManager(16, 4)
  bm.allocate("a", list(range(10)))
  assert bm.allocate("b", list(range(10))) == 0          # nothing committed yet
  bm.commit("a", list(range(6)))                          # one full page written
  assert bm.allocate("c", list(range(10))) == 4
  bm.commit("a", list(range(10)))                         # the third page is partial
  assert bm.allocate("d", list(range(11)) + [0, 0]) == 8


def test_numpy_prompts_hit_list_prompts():
  bm = BlockManager(8, 2)
  committed(bm, "a", np.array([3, 1, 4, 1, 5], np.int32))
  assert bm.allocate("b", [3, 1, 4, 1, 5]) == 4


def test_hit_revives_an_evictable_page():
  bm = BlockManager(8, 4)
  committed(bm, "a", list(range(9)))
  pages = bm.block_table("a")
  bm.free("a")
  assert bm.num_used_pages == 0 and bm.num_free_pages == 7
  assert bm.allocate("b", list(range(9))) == 8
  assert bm.block_table("b")[:2] == pages[:2]
  assert [bm.refcount(p) for p in pages[:2]] == [1, 1]
  assert (bm.num_used_pages, bm.num_free_pages) == (3, 4)
  bm.check_invariants()


def test_prefix_caching_disabled_never_hits():
  bm = BlockManager(8, 2, enable_prefix_caching=False)
  committed(bm, "a", [1, 2, 3, 4, 5])
  assert bm.allocate("b", [1, 2, 3, 4, 5]) == 0
  assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
  bm.free("a")
  assert committed(bm, "c", [1, 2, 3, 4, 5]) == 0
  assert bm.stats.prefix_queries_tokens == 15 and bm.stats.prefix_hits_tokens == 0
  bm.check_invariants()


def test_commit_of_an_already_cached_page_keeps_the_own_page():
  bm = BlockManager(16, 2)
  prompt = [1, 2, 3, 4, 5]
  assert bm.allocate("a", prompt) == bm.allocate("b", prompt) == 0  # computed concurrently
  bm.commit("a", prompt)
  table_b = bm.block_table("b")
  bm.commit("b", prompt)
  assert bm.block_table("b") == table_b
  assert bm.allocate("c", prompt) == 4
  assert bm.block_table("c")[:2] == bm.block_table("a")[:2]
  # b chains on through a's entries: its next full page is a hit after a's two pages.
  assert bm.grow("b", 6)
  bm.commit("b", prompt + [6])
  assert bm.allocate("d", prompt + [6, 0]) == 6
  assert bm.block_table("d")[:3] == bm.block_table("a")[:2] + bm.block_table("b")[2:3]
  for s in "abcd":
    bm.free(s)
  # b's duplicate pages were never cached: they went back to the free list, not the LRU set, so
  # only a's two pages and b's third are evicted once the free list runs dry.
  assert bm.num_free_pages == 15
  [take_one_page(bm, i) for i in range(15)]
  assert bm.stats.evictions == 3
  bm.check_invariants()


# Hash collisions


def test_constant_hash_never_serves_other_tokens(monkeypatch):
  monkeypatch.setattr(paging, "page_hash", lambda parent_hash, tokens: 0)
  bm = BlockManager(16, 2)
  committed(bm, "a", [1, 2, 3, 4, 5])
  assert bm.allocate("b", [1, 9, 3, 4, 5]) == 0
  assert bm.allocate("c", [3, 4, 3, 4, 5]) == 0  # a's second page under the same hash
  committed(bm, "d", [7, 8, 9])
  assert bm.allocate("e", [7, 8, 0]) == 2        # the newest content holds the slot
  assert bm.allocate("f", [1, 2, 0]) == 0
  bm.check_invariants()


def test_hit_checks_the_parent_entry_not_only_the_tokens(monkeypatch):
  # A hash blind to each page's first token: [1, 2] and [7, 2] collide, and so do their chains.
  monkeypatch.setattr(paging, "page_hash", HASHES["blind_first_token"])
  bm = BlockManager(16, 2)
  committed(bm, "a", [1, 2, 3, 4, 5])   # caches [1, 2] and [3, 4] after it
  bm.free("a")
  assert committed(bm, "c", [7, 2, 9]) == 0  # [7, 2] replaces [1, 2] in the colliding slot
  # [3, 4] is still cached under the same chained hash, but its K/V follow [1, 2], not [7, 2].
  assert bm.allocate("d", [7, 2, 3, 4, 5]) == 2
  bm.check_invariants()


# LRU eviction


def test_eviction_takes_the_least_recently_freed_page():
  bm = BlockManager(4, 2)  # 3 usable pages
  pages = {s: (committed(bm, s, p), bm.block_table(s)[0])[1]
           for s, p in (("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6]))}
  for s in "acb":
    bm.free(s)
  assert bm.num_free_pages == 3 and bm.num_used_pages == 0
  assert [take_one_page(bm, i) for i in range(3)] == [pages["a"], pages["c"], pages["b"]]
  assert bm.stats.evictions == 3
  assert bm.allocate("probe", [1, 2, 0], 0) == 0  # all evicted: no hit left
  bm.check_invariants()


def test_a_hit_refreshes_the_lru_position():
  bm = BlockManager(4, 2)
  pages = {s: (committed(bm, s, p), bm.block_table(s)[0])[1]
           for s, p in (("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6]))}
  for s in "abc":
    bm.free(s)
  assert bm.allocate("d", [1, 2, 0], num_tokens=2) == 2  # revives a's page, takes nothing else
  assert bm.block_table("d") == [pages["a"]] and bm.num_free_pages == 2
  bm.free("d")
  assert [take_one_page(bm, i) for i in range(3)] == [pages["b"], pages["c"], pages["a"]]


def test_a_sequence_frees_its_tail_first():
  bm = BlockManager(4, 2)
  committed(bm, "a", [1, 2, 3, 4, 5])  # pages: [1, 2] [3, 4] cached, [5] not
  first, second, last = bm.block_table("a")
  bm.free("a")
  assert [take_one_page(bm, i) for i in range(3)] == [last, second, first]
  assert bm.stats.evictions == 2


# The audit itself


def test_check_invariants_reports_corruption():
  def corrupted(edit):
    bm = BlockManager(8, 2)
    committed(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    committed(bm, "b", [9, 9, 9])
    bm.check_invariants()
    edit(bm)
    with pytest.raises(AssertionError, match="invariants broken"):
      bm.check_invariants()

  corrupted(lambda bm: bm._seqs["b"].pages.append(bm._seqs["b"].pages[0]))  # owned twice
  corrupted(lambda bm: bm._free.append(bm._seqs["b"].pages[0]))             # free and used
  corrupted(lambda bm: bm._seqs["b"].pages.append(BlockManager.NULL_PAGE))  # null handed out
  corrupted(lambda bm: bm._free.pop())                                      # a page leaked
  corrupted(lambda bm: bm._free.append(bm._evictable.popitem()[0]))         # freed, still cached


# Random operation sequences against a shadow KV cache

class ShadowEngine:
  """The engine's side over a BlockManager: allocate, compute K/V (recorded in `kv` as the token
  prefix each slot encodes), decode, grow, commit, free. Every hit must point at slots holding
  exactly the prompt's prefix; every refused call must change nothing."""

  def __init__(self, bm):
    self.bm, self.ps = bm, bm.page_size
    self.tokens: dict[int, list[int]] = {}     # live sequence -> prompt + sampled tokens
    self.written: dict[int, int] = {}          # live sequence -> tokens whose K/V are written
    self.kv: dict[int, dict[int, tuple]] = {}  # page -> slot -> prefix its K/V encode
    self.history: list[list[int]] = [[]]       # every sequence seen, to draw repeated prefixes from
    self.next_id = 0

  def pick(self, index):
    return sorted(self.tokens)[index % len(self.tokens)] if self.tokens else None

  def allocate(self, prompt, lookahead, prefill):
    bm, seq_id, num_tokens = self.bm, self.next_id, len(prompt) + lookahead
    self.next_id += 1
    free_before, before = bm.num_free_pages, state(bm)
    cached = bm.allocate(seq_id, prompt, num_tokens)
    if cached is None:
      assert state(bm) == before
      assert -(-num_tokens // self.ps) > free_before  # hits never make room scarcer
      return
    assert cached % self.ps == 0 and cached <= max((len(prompt) - 1) // self.ps, 0) * self.ps
    assert cached == 0 or bm.enable_prefix_caching
    table = bm.block_table(seq_id)
    assert len(table) == max(-(-num_tokens // self.ps), cached // self.ps)
    for i in range(cached):
      assert self.kv[table[i // self.ps]][i % self.ps] == tuple(prompt[:i + 1]), "wrong K/V hit"
    self.tokens[seq_id], self.written[seq_id] = list(prompt), cached
    self.history.append(list(prompt))
    if prefill:  # usually in the same step; else a later compute writes it
      self.compute(seq_id)
      bm.commit(seq_id, prompt)

  def repeat(self, which, cut, tail, lookahead, prefill):
    """Allocate a prompt that starts like an earlier one, so prefixes hit."""
    old = self.history[which % len(self.history)]
    self.allocate(old[:cut % (len(old) + 1)] + tail, lookahead, prefill)

  def compute(self, seq_id):
    """Write K/V for the unwritten tokens, as a prefill or decode step does."""
    tokens, table = self.tokens[seq_id], self.bm.block_table(seq_id)
    if len(tokens) > len(table) * self.ps:
      return  # the scheduler grows first
    others = {p for s in self.tokens if s != seq_id for p in self.bm.block_table(s)}
    for i in range(self.written[seq_id], len(tokens)):
      page = table[i // self.ps]
      assert page not in others and self.bm.refcount(page) == 1, "writing a shared page"
      self.kv.setdefault(page, {})[i % self.ps] = tuple(tokens[:i + 1])
    self.written[seq_id] = len(tokens)

  def decode(self, seq_id, token, commit):
    """One decode step: sample after the last written token, grow if needed, write, commit."""
    tokens = self.tokens[seq_id]
    if self.written[seq_id] < len(tokens) or not self.grow(seq_id, 1):
      return
    tokens.append(token)
    self.compute(seq_id)
    if commit:
      self.bm.commit(seq_id, tokens)

  def grow(self, seq_id, lookahead):
    bm, num_tokens = self.bm, len(self.tokens[seq_id]) + lookahead
    table, free_before, before = bm.block_table(seq_id), bm.num_free_pages, state(bm)
    if not bm.grow(seq_id, num_tokens):
      assert state(bm) == before
      assert -(-num_tokens // self.ps) - len(table) > free_before
      return False
    assert bm.num_tokens_capacity(seq_id) >= num_tokens
    assert bm.block_table(seq_id)[:len(table)] == table
    return True

  def commit(self, seq_id):
    self.bm.commit(seq_id, self.tokens[seq_id][:self.written[seq_id]])

  def free(self, seq_id):
    self.bm.free(seq_id)
    self.history.append(self.tokens.pop(seq_id))
    del self.written[seq_id]
    assert not self.bm.has(seq_id)
    before = state(self.bm)
    self.bm.free(seq_id)  # an abort path freeing again
    assert state(self.bm) == before

  def check(self):
    bm = self.bm
    bm.check_invariants()
    held = {p for s in self.tokens for p in bm.block_table(s)}
    assert BlockManager.NULL_PAGE not in held
    assert len(held) == bm.num_used_pages
    assert all(self.written[s] <= bm.num_tokens_capacity(s) for s in self.tokens)

  def free_all(self):
    for seq_id in list(self.tokens):
      self.free(seq_id)
    self.bm.check_invariants()
    assert self.bm.num_used_pages == 0
    assert self.bm.num_free_pages == self.bm.num_pages - 1


PROMPTS = st.lists(st.integers(0, 1), max_size=10)  # two tokens: prefixes collide often
SEQ = st.integers(0, 99)  # which live sequence, modulo their number
NEW = st.tuples(st.just("allocate"), PROMPTS, st.integers(0, 6), st.booleans())
REPEAT = st.tuples(st.just("repeat"), st.integers(0, 99), st.integers(0, 99),
                   st.lists(st.integers(0, 1), max_size=3), st.integers(0, 6), st.booleans())
DECODE = st.tuples(st.just("decode"), SEQ, st.integers(0, 1), st.booleans())
FREE = st.tuples(st.just("free"), SEQ)
OTHER = st.one_of(st.tuples(st.just("compute"), SEQ), st.tuples(st.just("commit"), SEQ),
                  st.tuples(st.just("grow"), SEQ, st.integers(0, 6)))
# Weighted and long enough that about half the runs hit the cache and many evict: short or
# allocate-starved runs (hypothesis's first guesses) never reach a hit.
OPS = st.lists(st.one_of(NEW, REPEAT, REPEAT, DECODE, DECODE, FREE, FREE, OTHER),
               min_size=30, max_size=80)


def run_ops(shadow, ops):
  for name, *args in ops:
    if name in ("allocate", "repeat"):
      getattr(shadow, name)(*args)
    elif shadow.tokens:
      getattr(shadow, name)(shadow.pick(args[0]), *args[1:])
    shadow.check()
  shadow.free_all()


HASHES = {
    "real": paging.page_hash,
    "weak": lambda parent_hash, tokens: hash((parent_hash, tokens)) % 3,
    "constant": lambda parent_hash, tokens: 0,
    "blind_first_token": lambda parent_hash, tokens: hash((parent_hash, tokens[1:])),
}


@pytest.mark.parametrize("hash_name, caching",
                         [(name, True) for name in HASHES] + [("real", False)])
@settings(max_examples=40, deadline=None)
@given(page_size=st.sampled_from([1, 2, 3, 4]), num_pages=st.integers(2, 24), ops=OPS)
def test_random_operations(hash_name, caching, page_size, num_pages, ops):
  with mock.patch.object(paging, "page_hash", HASHES[hash_name]):
    run_ops(ShadowEngine(BlockManager(num_pages, page_size, enable_prefix_caching=caching)), ops)
