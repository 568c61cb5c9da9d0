"""Rotary position embeddings in the Hugging Face "rotate_half" layout.

The two halves of each head (`x[..., :d/2]`, `x[..., d/2:]`) form the rotated pairs, which is the
layout of un-permuted Hugging Face weights; GGUF files store Llama Q/K permuted for the interleaved
layout, and `models.gguf` undoes that permutation at load time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """`kind="llama3"`: Llama 3.1 frequency-dependent scaling (all fields used);
  `kind="linear"`: every frequency divided by `factor` (position interpolation)."""

  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("llama3", "linear"):
      raise ValueError(f"RopeScaling: `kind` expected 'llama3' or 'linear', got {self.kind!r}")


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> np.ndarray:
  """float32 [head_dim // 2]: the rotation speed of each pair, scaled as the model was trained."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.kind == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  return _llama3_scaled(inv_freq, scaling).astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  # Long wavelengths (beyond the original context / low_freq_factor) are slowed by `factor`,
  # short ones (below original / high_freq_factor) kept, and the band between interpolated.
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """positions int32 [...] -> (cos, sin) float32 [..., 1, head_dim // 2], broadcast over heads."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [..., heads, head_dim]; rotation computed in float32, result in x's dtype."""
  half = x.shape[-1] // 2
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
