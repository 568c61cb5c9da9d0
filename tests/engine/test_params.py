import pytest

from engine import SamplingParams
from engine.buckets import Buckets, bucket, ladder


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("temperature", -0.1),
    ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("seed", -1), ("logprobs", 21), ("logprobs", -1),
    ("stop", [""]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
])
def test_bad_field_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"`{field}`"):
    SamplingParams(**{field: value})


def test_defaults_and_stop_strings():
  p = SamplingParams()
  assert (p.max_tokens, p.temperature, p.top_k, p.top_p) == (16, 1.0, 0, 1.0)
  assert SamplingParams(stop="x").stop_strings == ["x"]
  assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]
  assert SamplingParams(temperature=0).greedy


def test_ladders():
  assert ladder(1, 8) == (1, 2, 4, 8)
  assert ladder(1, 6) == (1, 2, 4, 6)
  assert ladder(16, 2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
  assert bucket(17, ladder(16, 2048)) == 32
  with pytest.raises(ValueError):
    bucket(3000, ladder(16, 2048))


def test_bucket_shapes_and_program_count():
  b = Buckets.for_limits(8, 2048)
  assert b.shapes(3, 20, 100) == (4, 32, 128)
  assert b.shapes(8, 300, 310) == (8, 512, 512)  # the cache holds at least the padded prompt
  programs = b.programs()
  assert len(programs) == len(set(programs))
  # Bounded: 4 batch rungs x (30 prefill (T, S) pairs + 5 decode cache lengths).
  assert len(programs) == 4 * (30 + 5)
  # Every shape a request can get is in the list.
  for n in (1, 3, 8):
    for prompt in (1, 15, 16, 17, 100, 1000, 2000):
      for new in (1, 64, 500):
        if prompt + new <= 2048:
          bb, t, s = b.shapes(n, prompt, prompt + new)
          assert ("prefill", (bb, t, s)) in programs and ("decode", (bb, s)) in programs
