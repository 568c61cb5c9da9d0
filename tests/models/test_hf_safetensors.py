"""Hugging Face directories (models.hf) against transformers: tiny random GPT-2, Llama 3 (llama3
RoPE scaling, sharded), Mistral (sliding window) and Qwen2 (QKV bias, tied) written by
tests/fixtures/make_hf_random_fixtures.py; the tokenizer; export; and the errors for bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import models
from models import hf
from models.gpt2 import GPT2
from models.llama import Llama
from pallas_kernels import testing
from tests.models._hf_random import HF_RANDOM, assert_same_params, hf_expected
from tests.models.test_llama import _forward

REL = 1e-4  # fp32, relative Frobenius error of all logits
FAMILY = {"gpt2": GPT2, "llama3": Llama, "mistral": Llama, "qwen2": Llama}


@pytest.fixture(scope="module")
def loaded():
  """name -> (model, tokenizer), each fixture loaded once through `models.load`."""
  return {name: models.load(HF_RANDOM / name) for name in FAMILY}


@pytest.mark.parametrize("name", list(FAMILY))
def test_logits_match_transformers(loaded, name):
  model, _ = loaded[name]
  tokens, ref = hf_expected(name)
  assert type(model) is FAMILY[name]
  assert testing.relative_error(_forward(model, jnp.asarray(tokens)), ref) <= REL


def test_configs_read_from_config_json(loaded):
  llama3, mistral, qwen2 = (loaded[n][0].config for n in ("llama3", "mistral", "qwen2"))
  # transformers >= 5 writes theta and scaling as `rope_parameters`
  assert llama3.rope_theta == 500000.0 and llama3.rope_scaling.kind == "llama3"
  assert llama3.rope_scaling.original_max_position_embeddings == 32
  assert mistral.sliding_window == 4 and not mistral.tie_word_embeddings
  assert qwen2.qkv_bias and qwen2.tie_word_embeddings and qwen2.sliding_window is None
  assert (HF_RANDOM / "llama3" / hf.INDEX).is_file()  # the sharded path was the one taken


def test_sliding_window_prefill_and_decode_match_transformers(loaded):
  """Mistral, window 4: prefill 7 tokens, decode the other 5 (each step past the window)."""
  model, _ = loaded["mistral"]
  tokens, ref = hf_expected("mistral")
  graphdef, state = nnx.split(model)
  cache = model.init_cache(2, 16)
  logits, cache = jax.jit(models.prefill_step, static_argnums=0)(
      graphdef, state, jnp.asarray(tokens[:, :7]), jnp.full((2,), 7, jnp.int32), cache)
  steps = [logits]
  decode = jax.jit(models.decode_step, static_argnums=0, donate_argnums=3)
  for t in range(7, tokens.shape[1]):
    logits, cache = decode(graphdef, state, jnp.asarray(tokens[:, t]), cache)
    steps.append(logits)
  assert testing.relative_error(jnp.stack(steps, axis=1), ref[:, 6:]) <= REL


def test_tokenizer_matches_transformers(loaded):
  _, tokenizer = loaded["gpt2"]
  expected = json.loads((HF_RANDOM / "tokenizer_expected.json").read_text(encoding="utf-8"))
  assert tokenizer.vocab_size == expected["vocab_size"]
  for case in expected["encode"]:
    assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
  assert tokenizer.bos_token == expected["bos_token"]
  assert tokenizer.eos_token == expected["eos_token"]
  chat = expected["chat"]
  assert tokenizer.apply_chat_template(chat["messages"], tokenize=False) == chat["text"]


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_export_round_trip(loaded, name, tmp_path):
  model, tokenizer = loaded[name]
  models.export_safetensors(model, tokenizer, tmp_path / name)
  again, tokenizer_again = models.load(tmp_path / name)
  assert type(again) is type(model) and again.config == model.config
  assert_same_params(again, model)
  assert tokenizer_again.encode("Hello world!") == tokenizer.encode("Hello world!")


# -- bad input --------------------------------------------------------------------------------

def _copy(name, tmp_path):
  return shutil.copytree(HF_RANDOM / name, tmp_path / name)


def _edit_config(directory, **changes):
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps(config | changes))


def _edit_tensors(directory, edit):
  path = directory / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def test_unknown_architecture_names_the_field(tmp_path):
  d = _copy("gpt2", tmp_path)
  _edit_config(d, architectures=["FalconForCausalLM"])
  with pytest.raises(ValueError,
                     match=r"`architectures` = \['FalconForCausalLM'\] is not supported"):
    models.load(d)
  _edit_config(d, architectures=None, model_type="falcon")
  with pytest.raises(ValueError, match="no `architectures` field and `model_type` = 'falcon'"):
    models.load(d)
  _edit_config(d, architectures=["LlamaForCausalLM"], hidden_act="gelu", model_type="llama",
               vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=4)
  with pytest.raises(ValueError, match="`hidden_act` = 'gelu' is not supported"):
    models.load(d)


def test_missing_shard_names_the_file(tmp_path):
  d = _copy("llama3", tmp_path)
  (d / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="shard 'model-00002-of-00003.safetensors'"):
    models.load(d)


def test_missing_weights_and_tokenizer_files(tmp_path):
  d = _copy("gpt2", tmp_path)
  (d / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    models.load(d)
  (d / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors"):
    hf.load_model(d)
  with pytest.raises(FileNotFoundError, match="path does not exist"):
    models.load(tmp_path / "nowhere" / "gpt2")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text("{")
  with pytest.raises(ValueError, match="not valid JSON"):
    models.load(tmp_path / "empty")


def test_bad_tensors_are_named(tmp_path):
  d = _copy("gpt2", tmp_path)
  name = "transformer.h.1.attn.c_attn.weight"
  _edit_tensors(d, lambda t: t.update({name: t[name][:, :96]}))
  with pytest.raises(ValueError,
                     match=rf"tensor '{name}' .*expected shape \(64, 192\), got \(64, 96\)"):
    models.load(d)
  _edit_tensors(d, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"tensor '{name}' is missing \(expected shape \(64, 192\)"):
    models.load(d)
  extra = "transformer.h.0.attn.q_norm.weight"
  _edit_tensors(d, lambda t: t.update({name: np.zeros((64, 192), np.float32),
                                       extra: np.ones(16, np.float32)}))
  with pytest.raises(ValueError, match=f"tensors the loader does not know: {extra}"):
    models.load(d)


def test_models_load_never_unpickles(tmp_path):
  """A directory with only PyTorch pickles is refused before anything is read."""
  d = _copy("gpt2", tmp_path)
  (d / "model.safetensors").rename(d / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    models.load(d)


# -- slow: a real model through export ----------------------------------------------------------

@pytest.mark.slow
def test_smollm2_exported_to_safetensors_loads_identically(tmp_path, smollm2_gguf):
  from models import gguf
  from models.tokenizer import Tokenizer

  model = gguf.load_llama(smollm2_gguf)
  tokenizer = Tokenizer.from_gguf(smollm2_gguf)
  models.export_safetensors(model, tokenizer, tmp_path / "smollm2")
  again, tokenizer_again = models.load(tmp_path / "smollm2")
  tokens = jnp.asarray([tokenizer.encode("The capital of France is")], jnp.int32)
  np.testing.assert_array_equal(_forward(again, tokens), _forward(model, tokens))
  text = "Hello 123 <|im_start|>user"
  assert tokenizer_again.encode(text) == tokenizer.encode(text)
  assert tokenizer_again.chat_template == tokenizer.chat_template
