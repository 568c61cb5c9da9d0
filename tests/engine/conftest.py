"""Engine test fixtures: shared engines over the tiny stand-in model, so the handful of programs
they compile (batch 1, 2, 4 x prompt bucket 16 x cache 128; v2: x block table 8 pages) are
compiled once per test session. `llm` is the default engine, `llm_v2` (paged, continuous
batching); `llm_v1` the static-batching engine it replaced (page_size=None)."""

import pytest

from engine import LLM
from tests.engine import _tiny_model

MAX_BATCH = 4
MAX_SEQ = 128


@pytest.fixture(scope="session")
def tiny():
  """(model, tokenizer) of the tiny random model."""
  return _tiny_model.load()


@pytest.fixture(scope="session")
def llm_v2(tiny):
  model, tokenizer = tiny
  return LLM.from_model(model, tokenizer, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ,
                        decode_steps=4)


@pytest.fixture(scope="session")
def llm(llm_v2):
  return llm_v2


@pytest.fixture(scope="session")
def llm_v1(tiny):
  model, tokenizer = tiny
  return LLM.from_model(model, tokenizer, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ,
                        decode_steps=4, page_size=None)
