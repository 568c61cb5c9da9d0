"""The Llama module on tiny random configs: cached == uncached (ragged batches, chunked prefill),
interpret-mode kernels == xla, cache donation in place, bf16, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.kv_cache import KVCache
from models.llama import Llama, LlamaConfig, decode_step, param_bytes, prefill_step
from tests.models.conftest import TINY, random_llama


def _tokens(batch, seq, vocab, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, jnp.int32)


def _forward(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)


def _cached_vs_uncached(model, lengths, decode_steps, *, atol):
  """Prefill right-padded ragged prompts, decode a few steps feeding each row's next token, and
  compare every step's logits with the uncached forward over the whole sequence."""
  lengths = jnp.asarray(lengths, jnp.int32)
  batch, prompt_len = len(lengths), int(lengths.max())
  seq = _tokens(batch, prompt_len + decode_steps, model.config.vocab_size)
  full = np.asarray(_forward(model, seq))  # [batch, seq, vocab]
  positions = np.arange(prompt_len)[None, :]
  padded = jnp.where(positions < lengths[:, None], seq[:, :prompt_len], 0)
  graphdef, state = nnx.split(model)
  prefill = jax.jit(prefill_step, static_argnums=0)
  decode = jax.jit(decode_step, static_argnums=0, donate_argnums=3)
  cache = model.init_cache(batch, prompt_len + decode_steps + 3)
  logits, cache = prefill(graphdef, state, padded, lengths, cache)
  rows = np.arange(batch)
  np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=atol, rtol=0)
  np.testing.assert_array_equal(cache.lengths, lengths)
  for step in range(decode_steps):
    at = np.asarray(cache.lengths)
    logits, cache = decode(graphdef, state, seq[rows, at], cache)
    np.testing.assert_allclose(logits, full[rows, at], atol=atol, rtol=0,
                               err_msg=f"decode step {step}")
    np.testing.assert_array_equal(cache.lengths, at + 1)
  assert logits.dtype == jnp.float32


def test_cached_matches_uncached_ragged():
  _cached_vs_uncached(random_llama(), lengths=[5, 1, 9], decode_steps=4, atol=2e-5)


def test_cached_matches_uncached_all_options():
  """Qwen2's QKV bias, an untied head, Llama 3.1 RoPE scaling and Mistral's sliding window
  (3 < the prompt lengths) in one model."""
  config = LlamaConfig.llama3_1_8b().replace(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
      num_kv_heads=1, head_dim=16, qkv_bias=True, sliding_window=3)
  assert not config.tie_word_embeddings
  _cached_vs_uncached(random_llama(config), lengths=[6, 2], decode_steps=3, atol=2e-5)


def test_interpret_kernels_match_xla():
  """The whole model through the Pallas kernels in interpret mode (one layer: it is slow)."""
  config = TINY.replace(num_layers=1, tie_word_embeddings=False)
  xla = random_llama(config)
  pallas = random_llama(config, impl="triton", interpret=True)
  lengths = jnp.asarray([7, 3], jnp.int32)
  seq = _tokens(2, 8, config.vocab_size)
  full = np.asarray(xla(seq))
  padded = jnp.where(jnp.arange(7)[None] < lengths[:, None], seq[:, :7], 0)
  graphdef, state = nnx.split(pallas)
  cache = pallas.init_cache(2, 16)
  logits, cache = jax.jit(prefill_step, static_argnums=0)(graphdef, state, padded, lengths, cache)
  np.testing.assert_allclose(logits, full[[0, 1], [6, 2]], atol=2e-5, rtol=0)
  logits, cache = jax.jit(decode_step, static_argnums=0)(graphdef, state, seq[[0, 1], [7, 3]],
                                                         cache)
  np.testing.assert_allclose(logits, full[[0, 1], [7, 3]], atol=2e-5, rtol=0)


def test_chunked_prefill_with_start():
  model = random_llama(TINY.replace(num_layers=1))
  graphdef, state = nnx.split(model)
  prefill = jax.jit(prefill_step, static_argnums=0)
  seq = _tokens(2, 10, TINY.vocab_size)
  full = np.asarray(_forward(model, seq))
  cache = model.init_cache(2, 16)
  first = jnp.asarray([4, 4], jnp.int32)
  _, cache = prefill(graphdef, state, seq[:, :4], first, cache)
  # Second chunk: row 0 has 6 more tokens, row 1 only 3 (right-padded).
  chunk_lengths = jnp.asarray([6, 3], jnp.int32)
  chunk = jnp.where(jnp.arange(6)[None] < chunk_lengths[:, None], seq[:, 4:10], 0)
  logits, cache = prefill(graphdef, state, chunk, chunk_lengths, cache, first)
  np.testing.assert_array_equal(cache.lengths, [10, 7])
  np.testing.assert_allclose(logits, full[[0, 1], [9, 6]], atol=2e-5, rtol=0)
  logits, cache = jax.jit(decode_step, static_argnums=0)(graphdef, state, seq[:, 7], cache)
  np.testing.assert_allclose(logits[1], full[1, 7], atol=2e-5, rtol=0)


def test_decode_updates_donated_cache_in_place():
  model = random_llama()
  graphdef, state = nnx.split(model)
  decode = jax.jit(decode_step, static_argnums=0, donate_argnums=3)
  cache = model.init_cache(2, 8)
  cache = cache.replace(lengths=jnp.asarray([1, 3], jnp.int32))
  pointers = [x.unsafe_buffer_pointer() for x in (*cache.k, *cache.v)]
  _, new = decode(graphdef, state, jnp.asarray([5, 6], jnp.int32), cache)
  assert [x.unsafe_buffer_pointer() for x in (*new.k, *new.v)] == pointers
  assert all(x.is_deleted() for x in cache.k)
  # The new K/V rows landed at each row's position, nothing else was touched.
  k0 = np.array(new.k[0])
  assert np.abs(k0[0, 1]).sum() > 0 and np.abs(k0[1, 3]).sum() > 0
  k0[0, 1] = k0[1, 3] = 0
  assert not k0.any()


def test_bfloat16_params_and_float32_logits():
  config = TINY.replace(num_layers=1)
  model = random_llama(config, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert param_bytes(model) * 2 == param_bytes(random_llama(config))
  _cached_vs_uncached(model, lengths=[4, 2], decode_steps=2, atol=0.05)


def test_forward_is_differentiable():
  model = random_llama(TINY.replace(num_layers=1))
  seq = _tokens(2, 6, TINY.vocab_size)

  def loss(model):
    logits = model(seq[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), seq[:, 1:, None], -1))

  graphdef, state = nnx.split(model)
  grads = jax.jit(jax.grad(lambda state: loss(nnx.merge(graphdef, state))))(state)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and all(n > 0 for n in norms)


def test_presets():
  smol = LlamaConfig.smollm2_135m()
  assert (smol.head_dim, smol.qkv_size, smol.tie_word_embeddings) == (64, 960, True)
  assert LlamaConfig.llama3_1_8b().rope_scaling.factor == 8.0
  assert LlamaConfig.mistral_7b().sliding_window == 4096
  assert LlamaConfig.qwen2_0_5b().qkv_bias and LlamaConfig.qwen2_7b().head_dim == 128
  assert LlamaConfig.llama2_7b().num_kv_heads == 32
  hf = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
  assert LlamaConfig.from_hf_dict(hf) == LlamaConfig.llama3_1_8b()


def test_bad_inputs_name_the_argument():
  model = random_llama()
  cache = model.init_cache(2, 8)
  with pytest.raises(ValueError, match="num_heads"):
    TINY.replace(num_kv_heads=3)
  with pytest.raises(TypeError, match="dtype"):
    Llama(TINY, dtype=jnp.float16, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="`tokens` expected int32"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(TypeError, match="`lengths` expected int32 \\(2,\\)"):
    model.prefill(jnp.zeros((2, 3), jnp.int32), jnp.zeros((3,), jnp.int32), cache)
  with pytest.raises(ValueError, match="`cache` expected 2 layers"):
    model.decode(jnp.zeros((3,), jnp.int32), cache)
  with pytest.raises(ValueError, match="max_seq_len 8"):
    model.prefill(jnp.zeros((2, 9), jnp.int32), jnp.ones((2,), jnp.int32), cache)


def test_kv_cache_create_is_a_pytree():
  cache = KVCache.create(3, 2, 16, 4, 8, jnp.bfloat16)
  assert (cache.num_layers, cache.max_batch, cache.max_seq_len) == (3, 2, 16)
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 7 and leaves[0].shape == (2, 16, 4, 8) and leaves[0].dtype == jnp.bfloat16
  assert cache.lengths.dtype == jnp.int32
