"""Detokenization with the byte tokenizer: every multi-byte character spans several tokens."""

from engine.detok import Detokenizer
from tests.engine._tiny_model import ByteTokenizer

TOK = ByteTokenizer()


def _stream(text, stops=(), chunk=1):
  ids = TOK.encode(text)
  d = Detokenizer(TOK, list(stops))
  deltas = []
  for end in range(chunk, len(ids) + chunk, chunk):
    part = ids[:end]
    hit = d.find_stop(part, max(end - chunk, 0))
    if hit:
      deltas.append(d.release(hit[1], final=True))
      return deltas, hit
    deltas.append(d.release(d.decode(part), final=end >= len(ids)))
  return deltas, None


def test_incomplete_utf8_is_held_back():
  text = "naïve 日本語 🎉!"
  for chunk in (1, 2, 3):
    deltas, _ = _stream(text, chunk=chunk)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_truncates_exactly_and_names_the_token():
  deltas, hit = _stream("hello wörld, stop here please", stops=["ld,", "zzz"])
  n, text, stop = hit
  assert text == "hello wör" and stop == "ld,"
  assert "".join(deltas) == "hello wör"
  assert TOK.decode(TOK.encode("hello wörld, stop")[:n]).endswith("ld,")
  assert not TOK.decode(TOK.encode("hello wörld, stop")[:n - 1]).endswith("ld,")


def test_stop_string_never_streamed_in_part():
  deltas, hit = _stream("abcXYZdef", stops=["XYZ"], chunk=1)
  assert hit[1] == "abc"
  assert "".join(deltas) == "abc"
  assert all("X" not in d for d in deltas)


def test_earliest_stop_string_wins():
  _, hit = _stream("one two three", stops=["three", "two"], chunk=13)
  assert hit[1] == "one " and hit[2] == "two"
