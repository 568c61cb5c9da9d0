"""What device are we compiling for?

Normally the first jax device; under `jax.sharding.use_abstract_mesh` with an
`AbstractDevice` (the offline audit), the abstract device, so that kernels pick
the config for the GPU they are lowered for even on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

# device_kind substrings -> (compute capability, max shared memory per block in bytes, SM count).
_KNOWN_GPUS = (
    ("H200", (9, 0), 227 * 1024, 132),
    ("H100", (9, 0), 227 * 1024, 132),
    ("H800", (9, 0), 227 * 1024, 132),
    ("A100", (8, 0), 163 * 1024, 108),
    ("A800", (8, 0), 163 * 1024, 108),
    ("A10", (8, 6), 99 * 1024, 72),
    ("L4", (8, 9), 99 * 1024, 58),
    ("L40", (8, 9), 99 * 1024, 142),
    ("RTX 4090", (8, 9), 99 * 1024, 128),
    ("RTX 3090", (8, 6), 99 * 1024, 82),
)


@dataclasses.dataclass(frozen=True)
class Target:
  """The device a kernel is being built for."""

  platform: str  # "cpu", "gpu", "tpu"
  device_kind: str
  compute_capability: tuple[int, int] | None = None
  max_shared_memory_bytes: int | None = None
  num_sms: int | None = None

  @property
  def is_gpu(self) -> bool:
    return self.platform == "gpu"

  @property
  def is_hopper(self) -> bool:
    return self.compute_capability is not None and self.compute_capability[0] == 9


@functools.lru_cache(maxsize=None)
def _gpu_target(device_kind: str, num_cores: int | None) -> Target:
  for marker, cc, smem, sms in _KNOWN_GPUS:
    if marker in device_kind:
      return Target("gpu", device_kind, cc, smem, num_cores or sms)
  # Unknown NVIDIA card: assume Ampere-class limits, the conservative choice.
  return Target("gpu", device_kind, (8, 0), 99 * 1024, num_cores)


def current_target() -> Target:
  """The abstract device of an active abstract mesh, else jax's first device."""
  mesh = jax.sharding.get_abstract_mesh()
  abstract_device = getattr(mesh, "abstract_device", None)
  if abstract_device is not None and abstract_device.platform == "gpu":
    return _gpu_target(abstract_device.device_kind, abstract_device.num_cores)
  device = jax.devices()[0]
  if device.platform == "gpu":
    return _gpu_target(device.device_kind, getattr(device, "core_count", None))
  return Target(device.platform, device.device_kind)


def on_gpu() -> bool:
  """Is jax's first device a GPU? (An abstract mesh does not count: nothing can run on it.)"""
  return jax.devices()[0].platform == "gpu"
