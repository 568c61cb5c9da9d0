"""The tiny random Hugging Face checkpoints of tests/fixtures/hf_random (written by
tests/fixtures/make_hf_random_fixtures.py) and their transformers logits."""

from pathlib import Path

import jax
import numpy as np
from flax import nnx

HF_RANDOM = Path(__file__).resolve().parents[1] / "fixtures" / "hf_random"


def hf_expected(name: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [2, 12], transformers' float32 logits [2, 12, vocab]) of fixture `name`."""
  with np.load(HF_RANDOM / name / "expected.npz") as f:
    return f["tokens"], f["logits"]


def assert_same_params(a, b):
  """Bitwise-equal parameters (same config and code, hence identical logits)."""
  a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (a, b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True), a, b)
