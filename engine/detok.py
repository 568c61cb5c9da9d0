"""Incremental detokenization: text released as it becomes final, stop strings cut exactly.

The text of a request is always `tokenizer.decode(ids)` of its text tokens; what has been released
(streamed) is a prefix of it that can no longer change: an incomplete UTF-8 character at the end
(decoded as U+FFFD) is held back, and so are the last `len(longest stop string) - 1` characters,
which could be the start of a stop string. The concatenation of the released deltas is therefore
exactly the final text.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class Detokenizer:

  def __init__(self, tokenizer, stop_strings: list[str]):
    self.tokenizer = tokenizer
    self.stops = list(stop_strings)
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.released = ""

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids)

  def _earliest_stop(self, text: str) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in self.stops]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits, key=lambda h: h[0]) if hits else None

  def find_stop(self, ids: list[int], first_new: int) -> tuple[int, str, str] | None:
    """If a stop string occurs in decode(ids): (number of ids up to the one that completed it,
    the text before it, the stop string). Only ids from `first_new` on can complete one."""
    if not self.stops:
      return None
    if self._earliest_stop(self.decode(ids)) is None:
      return None
    for n in range(max(first_new, 1), len(ids) + 1):
      text = self.decode(ids[:n])
      hit = self._earliest_stop(text)
      if hit is not None:
        return n, text[:hit[0]], hit[1]
    raise AssertionError("unreachable: the stop string is in the full text")

  def release(self, text: str, final: bool) -> str:
    """The new final part of `text` (the whole text so far): the delta to stream."""
    if not final:
      end = len(text)
      while end and text[end - 1] == _REPLACEMENT:
        end -= 1
      text = text[:max(end - self.hold, 0)]
    if len(text) <= len(self.released) or not text.startswith(self.released):
      return ""
    delta = text[len(self.released):]
    self.released = text
    return delta
