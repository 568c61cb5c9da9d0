"""The GPUs the offline audit compiles for, and how to make jax lower for one on a CPU machine."""

from __future__ import annotations

import contextlib
import dataclasses

import jax

_KB = 1024


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """Per-SM and per-block limits of one GPU, as the CUDA occupancy calculator uses them."""

  key: str                      # "sm80": the `--target` spelling
  device_kind: str              # what jax reports as `device.device_kind`
  compute_capability: int       # 80, 90: Triton's GPUTarget arch
  num_sms: int
  max_shared_per_block: int     # bytes, with the opt-in carve-out (what XLA/Triton request)
  shared_per_sm: int            # bytes
  reserved_shared_per_block: int = 1 * _KB  # the driver keeps 1 KB per resident block
  shared_alloc_unit: int = 128
  registers_per_sm: int = 64 * _KB
  max_registers_per_thread: int = 255
  register_alloc_unit: int = 256            # registers, allocated per warp
  max_warps_per_sm: int = 64
  max_blocks_per_sm: int = 32

  @property
  def sm(self) -> str:
    return f"sm_{self.compute_capability}"


TARGETS: dict[str, GpuTarget] = {
    "sm80": GpuTarget("sm80", "NVIDIA A100-SXM4-80GB", 80, num_sms=108,
                      max_shared_per_block=163 * _KB, shared_per_sm=164 * _KB),
    "sm90": GpuTarget("sm90", "NVIDIA H100 80GB HBM3", 90, num_sms=132,
                      max_shared_per_block=227 * _KB, shared_per_sm=228 * _KB),
}


def abstract_mesh(target: GpuTarget) -> jax.sharding.AbstractMesh:
  device = jax.sharding.AbstractDevice(device_kind=target.device_kind, num_cores=target.num_sms,
                                       platform="gpu")
  return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)


@contextlib.contextmanager
def lowering_for(target: GpuTarget):
  """Inside, `_core.device.current_target()` and the Triton lowering both see `target`.

  Build every input (even a PRNG key) before entering: an eager op under an abstract mesh fails.
  """
  with jax.sharding.use_abstract_mesh(abstract_mesh(target)):
    yield
