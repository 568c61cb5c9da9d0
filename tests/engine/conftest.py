"""Engine test fixtures: one shared engine over the tiny stand-in model, so the handful of programs
it compiles (batch 1, 2, 4 x prompt bucket 16 x cache 128) are compiled once per test session."""

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
def llm(tiny):
  model, tokenizer = tiny
  return LLM.from_model(model, tokenizer, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ,
                        decode_steps=4)
