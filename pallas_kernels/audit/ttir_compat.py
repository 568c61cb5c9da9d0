"""Bridge differences between jaxlib's Triton dialect text and the triton wheel's parser.

jaxlib 0.11.2 bundles an older Triton dialect than the triton 3.9 wheel. One difference
breaks parsing of our kernels, found by compiling every op's audit cases:

- Load/store cache hints. jaxlib prints them as keywords after the operands,
    `tt.load %p, %m, %o evictionPolicy = evict_first : tensor<...>`
  (also `cacheModifier = ca`; properties `cache`/`evict` in generic form), while triton 3.9
  folded both into one attribute,
    `tt.load %p, %m, %o {cachePolicy = #tt.cache_policy<cache_modifier = none,
                                                       eviction_policy = evict_first>} : ...`
  The keyword form is a parse error in 3.9 ("expected ':'"). Printing the generic form
  instead would parse, but 3.9 silently drops the unknown `evict` property: the hint would be
  lost without a word. So the keywords are rewritten to the new attribute, and only when the
  text as printed does not parse (older triton wheels take it unchanged).

Any other mismatch fails the compile with the parser's message: add a rewrite here, with a test.
"""

from __future__ import annotations

import re

_HINT_OPS = re.compile(r"\btt\.(load|store|descriptor_load|descriptor_store)\b")
_CACHE = re.compile(r"\s+cacheModifier = (\w+)")
_EVICT = re.compile(r"\s+evictionPolicy = (\w+)")
_ATTR_DICT_BEFORE_TYPE = re.compile(r"\s+\{([^{}]*)\}(\s+:\s)")
_TYPE_COLON = re.compile(r"(\s+:\s)")


def has_old_cache_hints(ttir: str) -> bool:
  return bool(_CACHE.search(ttir) or _EVICT.search(ttir))


def _rewrite_line(line: str) -> str:
  if not _HINT_OPS.search(line):
    return line
  cache, evict = _CACHE.search(line), _EVICT.search(line)
  if not (cache or evict):
    return line
  line = _EVICT.sub("", _CACHE.sub("", line))
  modifier = cache.group(1) if cache else "none"
  eviction = evict.group(1) if evict else "evict_normal"
  policy = (f"cachePolicy = #tt.cache_policy<cache_modifier = {modifier}, "
            f"eviction_policy = {eviction}>")
  if _ATTR_DICT_BEFORE_TYPE.search(line):  # e.g. {isVolatile = true}: add to it
    return _ATTR_DICT_BEFORE_TYPE.sub(lambda m: f" {{{m.group(1)}, {policy}}}{m.group(2)}",
                                      line, count=1)
  return _TYPE_COLON.sub(lambda m: f" {{{policy}}}{m.group(1)}", line, count=1)


def new_cache_hints(ttir: str) -> str:
  """jaxlib's `cacheModifier = X evictionPolicy = Y` keywords -> triton 3.9's `cachePolicy`."""
  return "\n".join(_rewrite_line(line) for line in ttir.split("\n"))
