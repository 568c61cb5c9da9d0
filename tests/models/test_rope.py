"""RoPE: the rotate_half layout against complex multiplication, and Llama 3.1 scaling against
llama.cpp's formulation of it (the rope_freqs divisors its converter writes)."""

import math

import jax.numpy as jnp
import numpy as np

from models import rope
from models.rope import RopeScaling


def test_rotate_half_is_complex_rotation():
  rng = np.random.default_rng(0)
  head_dim, theta = 16, 10000.0
  x = rng.normal(size=(3, 5, 2, head_dim)).astype(np.float32)  # [batch, seq, heads, head_dim]
  positions = rng.integers(0, 4096, size=(3, 5)).astype(np.int32)
  cos, sin = rope.cos_sin(jnp.asarray(positions), rope.inverse_frequencies(head_dim, theta))
  got = np.asarray(rope.apply(jnp.asarray(x), cos, sin))
  # Pair i is (x[i], x[i + d/2]) as one complex number, turned by position * theta^(-2i/d).
  freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  turn = np.exp(1j * positions[..., None, None] * freqs)
  z = (x[..., :head_dim // 2] + 1j * x[..., head_dim // 2:]) * turn
  want = np.concatenate([z.real, z.imag], axis=-1)
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)  # float32 angles up to ~4096 rad


def test_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 32)), jnp.float32) for _ in range(2))
  inv_freq = rope.inverse_frequencies(32, 500000.0, RopeScaling())

  def score(m, n):
    rq = rope.apply(q, *rope.cos_sin(jnp.asarray([m]), inv_freq))
    rk = rope.apply(k, *rope.cos_sin(jnp.asarray([n]), inv_freq))
    return float(jnp.sum(rq * rk))

  assert math.isclose(score(7, 3), score(107, 103), rel_tol=1e-4)


def test_llama3_scaling_matches_llama_cpp_rope_freqs():
  head_dim, theta = 128, 500000.0
  s = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  plain = rope.inverse_frequencies(head_dim, theta)
  # convert_hf_to_gguf.py (LlamaModel, rope_type llama3): one divisor per frequency.
  low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
  divisors = []
  for freq in plain.astype(np.float64):
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      divisors.append(1.0)
    elif wavelen > low_wavelen:
      divisors.append(8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      divisors.append(1 / ((1 - smooth) / 8.0 + smooth))
  np.testing.assert_allclose(rope.inverse_frequencies(head_dim, theta, s), plain / divisors,
                             rtol=1e-6)
  assert 1.0 in divisors and 8.0 in divisors and any(1 < d < 8 for d in divisors)


def test_linear_scaling_divides_every_frequency():
  plain = rope.inverse_frequencies(64, 10000.0)
  scaled = rope.inverse_frequencies(64, 10000.0, RopeScaling("linear", factor=4.0))
  np.testing.assert_allclose(scaled, plain / 4, rtol=1e-6)
