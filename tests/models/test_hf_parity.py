"""SmolLM2-135M from its GGUF against Hugging Face transformers (fixture written by
tests/fixtures/make_hf_fixtures.py): last-position logits and 16 greedy tokens per prompt, all
prompts in one ragged batch through prefill + decode, and the uncached forward."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models

REL = 1e-3  # relative to the largest reference logit of the row


@pytest.fixture(scope="module")
def smollm2(smollm2_fixture, smollm2_gguf):
  with open(smollm2_gguf.path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  if digest != smollm2_fixture["gguf"]["sha256"]:
    pytest.skip("the installed SmolLM2 GGUF is not the file the fixture was made from")
  model, _ = models.load("smollm2-135m", impl="xla")
  return model


def _check_row(logits, ref, name):
  logits = np.asarray(logits, np.float64)
  top = np.asarray(ref["top_indices"])
  scale = np.abs(ref["top_logits"]).max()
  np.testing.assert_allclose(logits[top], ref["top_logits"], atol=REL * scale, rtol=0,
                             err_msg=name)
  assert abs(np.linalg.norm(logits) - ref["row_norm"]) <= REL * ref["row_norm"], name
  assert int(np.argmax(logits)) == top[0], name


def test_ragged_batch_prefill_and_greedy_decode_match_hf(smollm2, smollm2_fixture):
  prompts = smollm2_fixture["prompts"]
  lengths = np.asarray([len(p["ids"]) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p["ids"])] = p["ids"]
  steps = len(prompts[0]["greedy"])
  graphdef, state = nnx.split(smollm2)
  prefill = jax.jit(models.prefill_step, static_argnums=0, donate_argnums=4)
  decode = jax.jit(models.decode_step, static_argnums=0, donate_argnums=3)
  cache = smollm2.init_cache(len(prompts), int(lengths.max()) + steps)
  logits, cache = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache)
  for row, p in enumerate(prompts):
    _check_row(logits[row], p, p["name"])
  generated = []
  for _ in range(steps):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    generated.append(np.asarray(token))
    logits, cache = decode(graphdef, state, token, cache)
  generated = np.stack(generated, axis=1)
  for row, p in enumerate(prompts):
    assert generated[row].tolist() == p["greedy"], p["name"]


def test_uncached_forward_matches_hf(smollm2, smollm2_fixture):
  prompt = smollm2_fixture["prompts"][1]  # code
  sequence = prompt["ids"] + prompt["greedy"]
  graphdef, state = nnx.split(smollm2)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  logits = forward(state, jnp.asarray([sequence], jnp.int32))[0]
  _check_row(logits[len(prompt["ids"]) - 1], prompt, prompt["name"])
  # Teacher-forced on HF's continuation, the argmax reproduces it.
  n = len(prompt["ids"])
  assert np.argmax(logits[n - 1:-1], axis=-1).tolist() == prompt["greedy"]
