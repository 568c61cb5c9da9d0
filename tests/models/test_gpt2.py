"""GPT-2 (models.gpt2) on the tiny random transformers fixture: cached == uncached, Pallas kernels
in interpret mode == xla, the engine's greedy generation == an argmax loop, bf16, presets, errors.
Its logits against transformers are in test_hf_safetensors.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import hf
from models.gpt2 import GPT2, GPT2Config
from models.llama import param_bytes
from pallas_kernels import testing
from tests.models._hf_random import HF_RANDOM, hf_expected
from tests.models.test_llama import _cached_vs_uncached, _forward

GPT2_DIR = HF_RANDOM / "gpt2"


@pytest.fixture(scope="module")
def gpt2():
  return hf.load_model(GPT2_DIR)


def test_cached_matches_uncached_ragged(gpt2):
  _cached_vs_uncached(gpt2, lengths=[5, 1, 9], decode_steps=4, atol=2e-5)


def test_chunked_prefill_matches_transformers(gpt2):
  """A second, ragged prefill chunk at `start`: the learned positions follow the absolute
  position."""
  tokens, ref = hf_expected("gpt2")
  graphdef, state = nnx.split(gpt2)
  prefill = jax.jit(models.prefill_step, static_argnums=0)
  cache = gpt2.init_cache(2, 16)
  three = jnp.full((2,), 3, jnp.int32)
  _, cache = prefill(graphdef, state, jnp.asarray(tokens[:, :3]), three, cache)
  logits, cache = prefill(graphdef, state, jnp.asarray(tokens[:, 3:8]),
                          jnp.asarray([5, 2], jnp.int32), cache, three)
  np.testing.assert_array_equal(cache.lengths, [8, 5])
  assert testing.relative_error(logits, ref[[0, 1], [7, 4]]) <= 1e-4


def test_interpret_kernels_match_xla(gpt2):
  """LayerNorm with residual, the bias and GELU-tanh epilogues, attention and the tied head, all
  through the Pallas kernels in interpret mode (one layer of the fixture: it is slow)."""
  pallas = _first_layer(hf.load_model(GPT2_DIR, impl="triton", interpret=True))
  tokens = jnp.asarray(hf_expected("gpt2")[0][:, :8])
  ref = _forward(_first_layer(hf.load_model(GPT2_DIR)), tokens)
  assert testing.relative_error(_forward(pallas, tokens), ref) <= 1e-5


@pytest.mark.slow
def test_interpret_prefill_and_decode_match_transformers():
  pallas = hf.load_model(GPT2_DIR, impl="triton", interpret=True)
  tokens, ref = hf_expected("gpt2")
  graphdef, state = nnx.split(pallas)
  cache = pallas.init_cache(2, 16)
  logits, cache = jax.jit(models.prefill_step, static_argnums=0)(
      graphdef, state, jnp.asarray(tokens[:, :7]), jnp.asarray([7, 4], jnp.int32), cache)
  assert testing.relative_error(logits, ref[[0, 1], [6, 3]]) <= 1e-4
  logits, cache = jax.jit(models.decode_step, static_argnums=0)(
      graphdef, state, jnp.asarray(tokens[[0, 1], [7, 4]]), cache)
  assert testing.relative_error(logits, ref[[0, 1], [7, 4]]) <= 1e-4


def _first_layer(model: GPT2) -> GPT2:
  model.config = model.config.replace(num_layers=1)
  model.layers = nnx.List([model.layers[0]])
  return model


@pytest.mark.slow
def test_engine_greedy_generation_matches_argmax_loop(gpt2):
  """The engine drives GPT-2 through the same generic entry points as Llama."""
  from engine.llm import LLM
  from engine.params import SamplingParams

  llm = LLM(str(GPT2_DIR), max_batch_size=2, max_seq_len=32, decode_steps=4)
  prompt = [5, 77, 140, 9]
  out, = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
  ids = list(prompt)
  for _ in range(6):
    ids.append(int(jnp.argmax(gpt2(jnp.asarray([ids], jnp.int32))[0, -1])))
  assert out.token_ids == ids[len(prompt):]


def test_bfloat16_params_and_float32_logits():
  model = hf.load_model(GPT2_DIR, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
  tokens, ref = hf_expected("gpt2")
  logits = _forward(model, jnp.asarray(tokens))
  assert logits.dtype == jnp.float32 and testing.relative_error(logits, ref) <= 3e-2


def test_presets_have_the_published_parameter_counts():
  for config, count in ((GPT2Config.gpt2(), 124_439_808), (GPT2Config.gpt2_medium(), 354_823_168)):
    model = nnx.eval_shape(lambda c=config: GPT2(c, rngs=nnx.Rngs(0)))
    assert param_bytes(model) == 4 * count
  assert GPT2Config.gpt2().intermediate_size == 3072 and GPT2Config.gpt2().head_dim == 64


def test_bad_inputs_name_the_argument(gpt2):
  with pytest.raises(ValueError, match="`hidden_size` \\(64\\) expected a multiple of `num_heads`"):
    GPT2Config(vocab_size=32, hidden_size=64, num_layers=1, num_heads=5)
  with pytest.raises(TypeError, match="GPT2: `dtype` expected float32 or bfloat16"):
    GPT2(GPT2Config(vocab_size=32, hidden_size=64, num_layers=1, num_heads=4),
         dtype=jnp.float16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`max_seq_len` expected <= max_position_embeddings \\(64"):
    gpt2.init_cache(1, 65)
  with pytest.raises(TypeError, match="GPT2.decode: `tokens` expected int32"):
    gpt2.decode(jnp.zeros((2,), jnp.float32), gpt2.init_cache(2, 8))
  hf_config = {"vocab_size": 32, "n_embd": 64, "n_layer": 1, "n_head": 4}
  with pytest.raises(ValueError, match="`activation_function` expected one of .* got 'swish'"):
    GPT2Config.from_hf_dict(hf_config | {"activation_function": "swish"})
  with pytest.raises(ValueError, match="`scale_attn_by_inverse_layer_idx` = True is not supported"):
    GPT2Config.from_hf_dict(hf_config | {"scale_attn_by_inverse_layer_idx": True})
