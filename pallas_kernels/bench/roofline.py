"""The roofline of the card in hand, measured in the same run as the kernels.

peak FLOP/s: an 8192^3 bf16 `jnp.dot` on random data (XLA -> cuBLAS).
peak bandwidth: a large elementwise copy (`x + 1` over 1 GiB of fp32: one read, one write
per element), counting bytes read plus bytes written.
timer floor: the same timer on a one-element kernel: no time below it means anything.
dispatch floor: the wall-clock timer on that kernel: what one jitted call costs the host, the
least time per call a sequence of small launches can take outside a CUDA graph.

A case's floor time is max(flops / peak, bytes / bandwidth); its roofline fraction is
floor / measured time (1.0 would be a kernel at the measured ceiling). Both ceilings are
what the library achieves, not the datasheet, so a kernel can exceed 1.0 slightly.
The FLOP ceiling is the bf16 tensor-core rate: fp32 cases are held to it too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.bench import timing

MATMUL_N = 8192
COPY_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Roofline:
  peak_tflops: float   # measured bf16 matmul rate, TFLOP/s
  peak_gbps: float     # measured copy bandwidth (read + write), GB/s
  floor_ms: float      # the timer on an empty kernel
  dispatch_ms: float | None = None  # the wall-clock timer on the same kernel
  method: str = ""


def tflops(flops: float, ms: float) -> float:
  return flops / ms / 1e9


def gbps(bytes_moved: float, ms: float) -> float:
  return bytes_moved / ms / 1e6


def floor_time_ms(flops: float, bytes_moved: float, roof: Roofline) -> tuple[float, str]:
  """The least time the case can take on this card, and which ceiling sets it."""
  compute_ms = flops / (roof.peak_tflops * 1e9) if flops else 0.0
  memory_ms = bytes_moved / (roof.peak_gbps * 1e6) if bytes_moved else 0.0
  return (compute_ms, "compute") if compute_ms >= memory_ms else (memory_ms, "memory")


def fraction(ms: float, flops: float, bytes_moved: float, roof: Roofline) -> float:
  floor_ms, _ = floor_time_ms(flops, bytes_moved, roof)
  return floor_ms / ms if ms > 0 else float("nan")


def measure(timer, *, matmul_n: int = MATMUL_N, copy_bytes: int = COPY_BYTES,
            wallclock=None) -> Roofline:
  """Both ceilings and the timer floor with `timer`; the dispatch floor with `wallclock`."""
  ka, kb, kc = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (matmul_n, matmul_n), jnp.bfloat16)
  b = jax.random.normal(kb, (matmul_n, matmul_n), jnp.bfloat16)
  dot = jax.jit(jnp.dot)
  matmul = timer(dot, [(a, b)], {"case": f"roofline: bf16 matmul {matmul_n}^3"})
  del a, b
  x = jax.random.normal(kc, (copy_bytes // 4,), jnp.float32)
  copy = timer(jax.jit(lambda v: v + 1), [(x,)], {"case": "roofline: copy"})
  del x
  tiny, increment = jnp.ones((1,), jnp.float32), jax.jit(lambda v: v + 1)
  empty = timer(increment, [(tiny,)], {"case": "roofline: empty kernel"})
  wallclock = wallclock or timing.WallclockTimer()
  dispatch = wallclock(increment, [(tiny,)], {"case": "roofline: dispatch"})
  return Roofline(peak_tflops=tflops(2.0 * matmul_n**3, matmul.median_ms),
                  peak_gbps=gbps(2.0 * copy_bytes, copy.median_ms),
                  floor_ms=empty.median_ms, dispatch_ms=dispatch.median_ms, method=matmul.method)
