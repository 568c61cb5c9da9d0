"""Host-side page allocator for the paged KV cache, with prefix caching (vLLM's block manager).

The KV cache is a pool of `num_pages` pages of `page_size` token slots. A sequence's block table
lists its pages in order: position `i` lives in slot `i % page_size` of `table[i // page_size]`.
Page 0 (`NULL_PAGE`) is never handed out: padding writes and unused block-table entries point at it.

Every usable page is in exactly one of three states:
  used       refcount > 0: held by one sequence, or shared by several through a prefix hit.
  evictable  refcount 0 but still in the prefix cache, so a later prompt can hit it; kept in LRU
             order and reclaimed (oldest first) only when the free list is empty.
  free       refcount 0 and not cached.

Prefix cache. A FULL page is keyed by a chained hash, `page_hash(parent hash, its tokens)`, so its
key depends on every token before it. Hashes can collide, so a hit also checks the page's tokens
and the identity of its parent entry (`parent_serial`): by induction the whole prefix matches, and a
collision costs a miss, never wrong K/V. Each registration gets a fresh serial, so an entry whose
parent was evicted and re-registered can no longer be hit through the new parent.

Choices:
  - A hit reuses at most `(len(prompt) - 1) // page_size` pages: at least the last prompt token is
    computed, because the engine needs its logits.
  - commit() of a page whose content is already cached (another sequence computed the same prefix
    at the same time) keeps the sequence's own page and registers nothing: swapping pages would
    change a block table the device already uses. The duplicate page is freed, uncached, with its
    sequence. If the hash slot holds a different content (a collision, or an entry whose parent is
    gone), the newest page replaces it: the old entry is dropped, its page stays with its holders.
  - free() releases a table's pages last page first, so a prompt's tail is evicted before the
    leading pages its siblings are likeliest to share; pages freed later are evicted later.
  - free() of an unknown sequence is a no-op, so abort paths may free twice.
Each call costs O(pages it touches); check_invariants() is the O(pool) audit for tests.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

ROOT_HASH = 0    # parent hash of a sequence's first page
ROOT_SERIAL = 0  # parent serial of a sequence's first page; real entries count from 1


def page_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
  """Chained key of a full page. Python's hash of ints and tuples is seed-free, so the key is the
  same in every process; collisions are caught by the token check on each hit."""
  return hash((parent_hash, tokens))


@dataclasses.dataclass
class PagingStats:
  prefix_queries_tokens: int = 0  # prompt tokens of successful allocations
  prefix_hits_tokens: int = 0     # of which were served by the prefix cache
  evictions: int = 0              # cached pages dropped to make room

  @property
  def prefix_hit_rate(self) -> float:
    if not self.prefix_queries_tokens:
      return 0.0
    return self.prefix_hits_tokens / self.prefix_queries_tokens


@dataclasses.dataclass(frozen=True)
class _Entry:
  """A cached full page."""
  page: int
  hash: int
  tokens: tuple[int, ...]
  serial: int         # unique per registration
  parent_serial: int  # serial of the entry holding the previous page of this prefix


@dataclasses.dataclass
class _Seq:
  pages: list[int]
  num_hashed_pages: int = 0      # leading full pages already hit in or offered to the cache
  chain_hash: int = ROOT_HASH    # hash of the last of them
  chain_serial: int = ROOT_SERIAL  # serial of the cache entry holding that content


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(op: str, name: str, value, minimum: int) -> None:
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{op}: `{name}` expected an int >= {minimum}, got {value!r}")


class BlockManager:
  """Refcounted pages, a free list, and an LRU prefix cache of full pages."""

  NULL_PAGE = 0

  def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
    _check_int("BlockManager", "num_pages", num_pages, 2)  # the null page plus one usable page
    _check_int("BlockManager", "page_size", page_size, 1)
    self.num_pages = int(num_pages)
    self.page_size = int(page_size)
    self.enable_prefix_caching = bool(enable_prefix_caching)
    self.stats = PagingStats()
    self._refcount = [0] * self.num_pages
    # Popped from the end: the most recently freed page is reused first.
    self._free = list(range(self.num_pages - 1, self.NULL_PAGE, -1))
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
    self._entry_by_hash: dict[int, _Entry] = {}
    self._entry_by_page: dict[int, _Entry] = {}
    self._next_serial = ROOT_SERIAL + 1
    self._seqs: dict[Hashable, _Seq] = {}

  # Counts

  @property
  def num_free_pages(self) -> int:
    """Pages allocatable now: the free list plus evictable cached pages."""
    return len(self._free) + len(self._evictable)

  @property
  def num_used_pages(self) -> int:
    """Pages held by at least one sequence."""
    return self.num_pages - 1 - self.num_free_pages

  def refcount(self, page: int) -> int:
    """How many sequences hold `page` (more than one through prefix hits)."""
    return self._refcount[page]

  def can_allocate(self, num_tokens: int) -> bool:
    """Whether `num_tokens` fit without any prefix hit. Conservative: hits never need more pages,
    so True means allocate() succeeds; allocate() itself is the exact test."""
    _check_int("BlockManager.can_allocate", "num_tokens", num_tokens, 0)
    return _cdiv(num_tokens, self.page_size) <= self.num_free_pages

  # Sequences

  def has(self, seq_id: Hashable) -> bool:
    return seq_id in self._seqs

  def block_table(self, seq_id: Hashable) -> list[int]:
    """The sequence's page ids in order (a copy)."""
    return list(self._seqs[seq_id].pages)

  def num_tokens_capacity(self, seq_id: Hashable) -> int:
    return len(self._seqs[seq_id].pages) * self.page_size

  def allocate(self, seq_id: Hashable, token_ids: Sequence[int],
               num_tokens: int | None = None) -> int | None:
    """Add a sequence with prompt `token_ids` and pages for `num_tokens` positions (default: the
    prompt). Returns how many leading prompt tokens the prefix cache already holds (a multiple of
    `page_size`; the table also covers them), or None, changing nothing, when the pool is short."""
    if seq_id in self._seqs:
      raise ValueError(f"BlockManager.allocate: `seq_id` expected a new sequence, got {seq_id!r}, "
                       "which already holds pages")
    num_tokens = len(token_ids) if num_tokens is None else num_tokens
    _check_int("BlockManager.allocate", "num_tokens", num_tokens, 0)
    hits = self._match_prefix(token_ids)
    num_new_pages = max(_cdiv(num_tokens, self.page_size) - len(hits), 0)
    # Reviving an evictable hit takes it out of the allocatable pool.
    num_revived = sum(self._refcount[entry.page] == 0 for entry in hits)
    if num_new_pages > self.num_free_pages - num_revived:
      return None
    for entry in hits:
      self._incref(entry.page)
    seq = _Seq([entry.page for entry in hits] + self._take(num_new_pages))
    if hits:
      seq.num_hashed_pages, seq.chain_hash, seq.chain_serial = (
          len(hits), hits[-1].hash, hits[-1].serial)
    self._seqs[seq_id] = seq
    num_cached_tokens = len(hits) * self.page_size
    self.stats.prefix_queries_tokens += len(token_ids)
    self.stats.prefix_hits_tokens += num_cached_tokens
    return num_cached_tokens

  def grow(self, seq_id: Hashable, num_tokens: int) -> bool:
    """Make the sequence's pages cover `num_tokens` positions (lookahead for multi-step decode).
    False, changing nothing, when the pool is short."""
    seq = self._seqs[seq_id]
    _check_int("BlockManager.grow", "num_tokens", num_tokens, 0)
    num_new_pages = _cdiv(num_tokens, self.page_size) - len(seq.pages)
    if num_new_pages > self.num_free_pages:
      return False
    seq.pages += self._take(num_new_pages)
    return True

  def commit(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
    """`token_ids`: the sequence's tokens whose K/V are now written (prompt + output so far).
    Offers each newly full page to the prefix cache."""
    seq = self._seqs[seq_id]
    capacity = len(seq.pages) * self.page_size
    if len(token_ids) > capacity:
      raise ValueError(f"BlockManager.commit: `token_ids` expected at most the sequence's "
                       f"capacity of {capacity} tokens, got {len(token_ids)}")
    if not self.enable_prefix_caching:
      return
    for k in range(seq.num_hashed_pages, len(token_ids) // self.page_size):
      self._offer_page(seq, k, self._page_tokens(token_ids, k))

  def free(self, seq_id: Hashable) -> None:
    """Release the sequence's pages. Unknown (or already freed) `seq_id`: a no-op, for aborts."""
    seq = self._seqs.pop(seq_id, None)
    if seq is None:
      return
    for page in reversed(seq.pages):  # tail first: it is evicted before the shared prefix
      self._decref(page)

  # Prefix cache

  def _page_tokens(self, token_ids: Sequence[int], k: int) -> tuple[int, ...]:
    # int() so numpy token arrays hash and compare like lists of ints.
    return tuple(int(t) for t in token_ids[k * self.page_size:(k + 1) * self.page_size])

  def _match_prefix(self, token_ids: Sequence[int]) -> list[_Entry]:
    """Cache entries of the prompt's leading full pages, up to the first miss, never including
    the page of the last prompt token."""
    if not self.enable_prefix_caching:
      return []
    hits, parent_hash, parent_serial = [], ROOT_HASH, ROOT_SERIAL
    for k in range(max((len(token_ids) - 1) // self.page_size, 0)):
      tokens = self._page_tokens(token_ids, k)
      key = page_hash(parent_hash, tokens)
      entry = self._entry_by_hash.get(key)
      if entry is None or entry.tokens != tokens or entry.parent_serial != parent_serial:
        break  # a miss, or a hash collision
      hits.append(entry)
      parent_hash, parent_serial = key, entry.serial
    return hits

  def _offer_page(self, seq: _Seq, k: int, tokens: tuple[int, ...]) -> None:
    """Register the sequence's full page `k`, unless its content is already cached."""
    key = page_hash(seq.chain_hash, tokens)
    entry = self._entry_by_hash.get(key)
    if entry is None or entry.tokens != tokens or entry.parent_serial != seq.chain_serial:
      if entry is not None:
        self._drop_entry(entry)  # a collision or a stale entry: the newest content wins
      entry = self._register(seq.pages[k], key, tokens, seq.chain_serial)
    # A duplicate keeps its own page uncached but chains on through the cached entry.
    seq.num_hashed_pages, seq.chain_hash, seq.chain_serial = k + 1, key, entry.serial

  def _register(self, page: int, key: int, tokens: tuple[int, ...], parent_serial: int) -> _Entry:
    entry = _Entry(page, key, tokens, self._next_serial, parent_serial)
    self._next_serial += 1
    self._entry_by_hash[key] = entry
    self._entry_by_page[page] = entry
    return entry

  def _unregister(self, page: int) -> None:
    entry = self._entry_by_page.pop(page)
    del self._entry_by_hash[entry.hash]

  def _drop_entry(self, entry: _Entry) -> None:
    """Uncache an entry; an evictable page becomes plain free, a used one stays with its holders."""
    self._unregister(entry.page)
    if self._refcount[entry.page] == 0:
      del self._evictable[entry.page]
      self._free.append(entry.page)

  # Refcounts

  def _take(self, num_pages: int) -> list[int]:
    return [self._take_one() for _ in range(num_pages)]

  def _take_one(self) -> int:
    """A page with refcount 1: from the free list, else the least recently freed cached page."""
    if self._free:
      page = self._free.pop()
    else:
      page, _ = self._evictable.popitem(last=False)
      self._unregister(page)
      self.stats.evictions += 1
    self._refcount[page] = 1
    return page

  def _incref(self, page: int) -> None:
    if self._refcount[page] == 0:
      del self._evictable[page]  # a hit revives a cached page
    self._refcount[page] += 1

  def _decref(self, page: int) -> None:
    self._refcount[page] -= 1
    if self._refcount[page] == 0:
      if page in self._entry_by_page:
        self._evictable[page] = None  # newest at the end: evicted last
      else:
        self._free.append(page)

  # Audit

  def check_invariants(self) -> None:
    """Raise AssertionError listing every broken invariant (O(pool); for tests and debugging)."""
    problems = (self._seq_problems() + self._refcount_problems() + self._pool_problems()
                + self._cache_problems() + self._stats_problems())
    if problems:
      raise AssertionError("BlockManager invariants broken:\n  " + "\n  ".join(problems))

  def _seq_problems(self) -> list[str]:
    problems = []
    for seq_id, seq in self._seqs.items():
      if len(set(seq.pages)) != len(seq.pages):
        problems.append(f"seq {seq_id!r} holds a page twice: {seq.pages}")
      if any(not 0 < p < self.num_pages for p in seq.pages):
        problems.append(f"seq {seq_id!r} holds the null page or an out-of-range page: {seq.pages}")
      if not 0 <= seq.num_hashed_pages <= len(seq.pages):
        problems.append(f"seq {seq_id!r} hashed {seq.num_hashed_pages} of {len(seq.pages)} pages")
    return problems

  def _refcount_problems(self) -> list[str]:
    holders = collections.Counter(p for seq in self._seqs.values() for p in seq.pages)
    return [f"page {p}: refcount {self._refcount[p]} but {holders[p]} holders"
            for p in range(self.num_pages) if self._refcount[p] != holders[p]]

  def _pool_problems(self) -> list[str]:
    problems = []
    free, evictable = set(self._free), set(self._evictable)
    used = {p for p in range(self.num_pages) if self._refcount[p] > 0}
    if len(free) != len(self._free):
      problems.append(f"free list holds a page twice: {sorted(self._free)}")
    if self.NULL_PAGE in free | evictable | used:
      problems.append("the null page is free, evictable or used")
    for name, pages in (("free and evictable", free & evictable), ("free and used", free & used),
                        ("evictable and used", evictable & used)):
      if pages:
        problems.append(f"pages both {name}: {sorted(pages)}")
    if len(self._free) + len(self._evictable) + len(used) != self.num_pages - 1:
      problems.append(f"free {len(self._free)} + evictable {len(self._evictable)} + used "
                      f"{len(used)} != {self.num_pages - 1} usable pages")
    if free & set(self._entry_by_page):
      problems.append(f"free pages still cached: {sorted(free & set(self._entry_by_page))}")
    if evictable - set(self._entry_by_page):
      problems.append(f"evictable pages not cached: {sorted(evictable - set(self._entry_by_page))}")
    return problems

  def _cache_problems(self) -> list[str]:
    problems = []
    if not self.enable_prefix_caching and self._entry_by_hash:
      problems.append("prefix caching is off but pages are cached")
    if len(self._entry_by_hash) != len(self._entry_by_page):
      problems.append(f"{len(self._entry_by_hash)} hash entries but "
                      f"{len(self._entry_by_page)} page entries")
    for key, entry in self._entry_by_hash.items():
      if entry.hash != key or self._entry_by_page.get(entry.page) is not entry:
        problems.append(f"hash {key} points at page {entry.page}, which is cached as "
                        f"{self._entry_by_page.get(entry.page)}")
      if entry.page == self.NULL_PAGE:
        problems.append("the null page is cached")
      if len(entry.tokens) != self.page_size or not entry.parent_serial < entry.serial:
        problems.append(f"malformed entry {entry}")
    return problems

  def _stats_problems(self) -> list[str]:
    s = self.stats
    if not 0 <= s.prefix_hits_tokens <= s.prefix_queries_tokens:
      return [f"prefix hits {s.prefix_hits_tokens} exceed queries {s.prefix_queries_tokens}"]
    return []
