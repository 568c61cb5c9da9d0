"""models.save / models.load of our Orbax checkpoints (models.checkpoint): round trips with
identical parameters, logits and tokenizer, the dtype on load, dispatch, and the errors for bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import checkpoint
from tests.models._hf_random import HF_RANDOM, assert_same_params, hf_expected


@pytest.fixture(scope="module")
def gpt2():
  return models.load(HF_RANDOM / "gpt2")


@pytest.fixture(scope="module")
def saved(gpt2, tmp_path_factory):
  model, tokenizer = gpt2
  return models.save(model, tokenizer, tmp_path_factory.mktemp("orbax") / "gpt2")


def _same_logits(a, b, tokens):
  """Both models through one compiled forward (same graph), compared bit for bit."""
  graphdef, state_a = nnx.split(a)
  _, state_b = nnx.split(b)
  forward = jax.jit(lambda state: nnx.merge(graphdef, state)(tokens))
  np.testing.assert_array_equal(forward(state_b), forward(state_a))


def test_round_trip_identical_logits_and_tokenizer(gpt2, saved):
  model, tokenizer = gpt2
  assert {p.name for p in saved.iterdir()} == {"params", "tokenizer", checkpoint.METADATA}
  again, tokenizer_again = models.load(saved)
  assert type(again) is type(model) and again.config == model.config
  assert_same_params(again, model)
  _same_logits(again, model, jnp.asarray(hf_expected("gpt2")[0]))
  expected = json.loads((HF_RANDOM / "tokenizer_expected.json").read_text(encoding="utf-8"))
  for case in expected["encode"]:
    assert tokenizer_again.encode(case["text"]) == case["ids"], case["text"]
  assert (tokenizer_again.bos_token_id, tokenizer_again.eos_token_id) == (
      tokenizer.bos_token_id, tokenizer.eos_token_id)
  assert tokenizer_again.chat_template == tokenizer.chat_template


def test_dtype_is_kept_and_can_be_changed_on_load(tmp_path):
  """Llama 3 (RoPE scaling in the JSON config, untied head) saved in bfloat16: loads as bfloat16
  by default, as float32 on request (Orbax converts while restoring)."""
  model, tokenizer = models.load(HF_RANDOM / "llama3", dtype="bfloat16")
  models.save(model, tokenizer, tmp_path / "ckpt")
  again, _ = models.load(tmp_path / "ckpt")
  assert again.dtype == jnp.bfloat16 and again.config == model.config
  assert again.config.rope_scaling.kind == "llama3"
  assert_same_params(again, model)
  wide, _ = models.load(tmp_path / "ckpt", dtype=jnp.float32)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  widened = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True),
               nnx.to_pure_dict(nnx.state(wide, nnx.Param)), widened)


def test_bad_input(gpt2, saved, tmp_path):
  model, tokenizer = gpt2
  with pytest.raises(FileExistsError, match="`path` expected a new or empty directory"):
    models.save(model, tokenizer, saved)
  with pytest.raises(TypeError, match="`model` expected one of Llama, GPT2, got str"):
    models.save("gpt2", tokenizer, tmp_path / "x")
  with pytest.raises(TypeError, match="`tokenizer` expected a models.Tokenizer"):
    models.save(model, None, tmp_path / "x")
  with pytest.raises(ValueError, match="Orbax checkpoint without pallax_model.json.*parent"):
    models.load(saved / "params")
  copy = shutil.copytree(saved, tmp_path / "copy", ignore=shutil.ignore_patterns("params"))
  meta = json.loads((copy / checkpoint.METADATA).read_text())
  (copy / checkpoint.METADATA).write_text(json.dumps(meta | {"family": "t5"}))
  with pytest.raises(ValueError, match="`family` expected one of llama, gpt2, got 't5'"):
    models.load(copy)
  meta["config"]["n_experts"] = 8
  (copy / checkpoint.METADATA).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="`config` does not fit GPT2Config.*n_experts"):
    models.load(copy)


@pytest.mark.slow
def test_smollm2_gguf_round_trip(smollm2_gguf, tmp_path):
  from models import gguf
  from models.tokenizer import Tokenizer

  model = gguf.load_llama(smollm2_gguf)
  tokenizer = Tokenizer.from_gguf(smollm2_gguf)
  models.save(model, tokenizer, tmp_path / "smollm2")
  again, tokenizer_again = models.load(tmp_path / "smollm2")
  assert again.config == model.config
  _same_logits(again, model, jnp.asarray([tokenizer.encode("The capital of France is")], jnp.int32))
  text = "Hello 123 <|im_start|>user\nHi<|im_end|>"
  assert tokenizer_again.encode(text) == tokenizer.encode(text)
  messages = [{"role": "user", "content": "Hi"}]
  assert tokenizer_again.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
