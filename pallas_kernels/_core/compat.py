"""Shims over Pallas API differences between the supported jax releases (0.11.2 to 0.12.x)."""

from __future__ import annotations

import warnings

from jax.experimental.pallas import triton as plt

# jax >= 0.11 warns on every Triton-path pallas_call that the backend is deprecated.
# It is still our Ampere path through 0.12 (the README says so); one note there, not one per call.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def triton_params(num_warps: int, num_stages: int) -> plt.CompilerParams:
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
