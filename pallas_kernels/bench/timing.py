"""Device time of one call of a jitted function, the median of many.

Two timers, one interface `timer(fn, input_sets, what) -> Timing`:

- "cupti" (default on a GPU): CUPTI records the start and end of every GPU kernel the
  calls launch, the way `jax.experimental.mosaic.gpu.profiler.measure` does it (same
  `_cupti_init` / `_cupti_get_timings` calls). The time of a call is the sum of its
  kernels' device durations; host dispatch and launch gaps are not in it. This is the
  event-style measurement jax has no public Python events for.
- "wallclock" (fallback): R dispatches back to back, ended by one `block_until_ready`,
  timed on the host and divided by R; K such batches, the median. While one call's
  device time exceeds its dispatch cost the device never idles and this is device
  time; below that it measures dispatch. The empty kernel of the roofline step shows
  that floor.

Calls rotate over several input sets (different seeds) when one set is small, so
repeated calls do not find their inputs in L2. `what` says what is being timed
(case, impl, config); real timers ignore it, test doubles use it.
See bench/notes/bench-method.md for the method and its limits.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

# Calls per timing: enough for a stable median, bounded by a time budget per timing.
MIN_REPS, MAX_REPS = 10, 500
# Input rotation: sets until their inputs exceed this (several times any L2), at most MAX_SETS.
ROTATE_BYTES = 256 << 20
MAX_SETS = 32


class TimingError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Timing:
  median_ms: float
  min_ms: float
  p10_ms: float
  p90_ms: float
  reps: int
  method: str

  @property
  def spread(self) -> float:
    """(p90 - p10) / median: how noisy the samples were."""
    return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else math.nan


class Timer(Protocol):
  name: str

  def __call__(self, fn: Callable, input_sets: Sequence[tuple],
               what: Mapping[str, Any]) -> Timing: ...


def summarize(samples_ms: Sequence[float], method: str) -> Timing:
  if not samples_ms:
    raise TimingError("no samples")
  p10, p90 = np.percentile(samples_ms, [10, 90])
  return Timing(statistics.median(samples_ms), min(samples_ms), float(p10), float(p90),
                len(samples_ms), method)


def input_bytes(inputs) -> int:
  return sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(inputs))


def num_input_sets(one_set_bytes: int, rotate_bytes: int = ROTATE_BYTES) -> int:
  if rotate_bytes <= 0 or one_set_bytes <= 0:
    return 1
  return max(1, min(MAX_SETS, math.ceil(rotate_bytes / one_set_bytes)))


def make_input_sets(case, rotate_bytes: int = ROTATE_BYTES) -> list[tuple]:
  """Inputs from seeds 0, 1, ...: as many sets as `num_input_sets` asks for."""
  first = tuple(case.inputs(0))
  count = num_input_sets(input_bytes(first), rotate_bytes)
  return [first] + [tuple(case.inputs(seed)) for seed in range(1, count)]


def _rough_ms(fn: Callable, input_sets: Sequence[tuple], calls: int = 3) -> float:
  """Host time of one blocked call, the best of a few: only to choose repetition counts."""
  best = math.inf
  for i in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    best = min(best, (time.perf_counter() - start) * 1e3)
  return best


def reps_for(rough_ms: float, budget_ms: float) -> int:
  return int(min(MAX_REPS, max(MIN_REPS, budget_ms / max(rough_ms, 1e-3))))


def per_call_ms(records: Sequence[tuple[str, float]], calls: int) -> list[float]:
  """CUPTI kernel records of `calls` identical calls, in launch order -> ms per call."""
  if not records:
    raise TimingError("CUPTI recorded no GPU kernel: nothing ran on the device")
  if len(records) % calls:
    raise TimingError(f"{len(records)} kernel records for {calls} calls: calls launched "
                      f"different kernels (recompilation or autotuning inside the timing?)")
  per_call = len(records) // calls
  names = [name for name, _ in records[:per_call]]
  times = []
  for i in range(calls):
    chunk = records[i * per_call:(i + 1) * per_call]
    if [name for name, _ in chunk] != names:
      raise TimingError("kernel names differ between calls")
    times.append(sum(ms for _, ms in chunk))
  return times


def cupti_extension():
  """jaxlib's Mosaic GPU extension if it offers CUPTI timings, else None."""
  try:
    from jax._src.lib import mosaic_gpu  # pytype: disable=import-error
    ext = mosaic_gpu._mosaic_gpu_ext
  except Exception:  # no CUDA plugin, or a jaxlib without it
    return None
  if hasattr(ext, "_cupti_init") and hasattr(ext, "_cupti_get_timings"):
    return ext
  return None


def cupti_records(ext, fn, input_sets: Sequence[tuple], calls: int) -> list[tuple[str, float]]:
  """(kernel name, ms) of every kernel that `calls` calls launched, in launch order."""
  ext._cupti_init()
  try:
    out = None
    for i in range(calls):
      out = fn(*input_sets[i % len(input_sets)])
      if i % 16 == 15:  # bound the queue; kernel durations do not include the waits
        jax.block_until_ready(out)
    jax.block_until_ready(out)
  finally:
    records = ext._cupti_get_timings(True)
  return list(records)


@dataclasses.dataclass
class CuptiTimer:
  budget_ms: float = 300.0
  reps: int | None = None
  name: str = "cupti"

  def __call__(self, fn, input_sets, what=None) -> Timing:
    ext = cupti_extension()
    if ext is None:
      raise TimingError("CUPTI timings are not available in this jaxlib")
    reps = self.reps or reps_for(_rough_ms(fn, input_sets), self.budget_ms)
    try:
      return summarize(per_call_ms(cupti_records(ext, fn, input_sets, reps), reps), self.name)
    except TimingError as exc:  # e.g. a call that launches no kernel: time it on the host
      fallback = WallclockTimer(budget_ms=self.budget_ms)(fn, input_sets, what)
      return dataclasses.replace(fallback, method=f"{fallback.method}, cupti failed: {exc}")


@dataclasses.dataclass
class WallclockTimer:
  budget_ms: float = 300.0
  batches: int = 15
  batch_ms: float = 20.0  # R is chosen so that a batch lasts about this long
  name: str = "wallclock"

  def __call__(self, fn, input_sets, what=None) -> Timing:
    rough = _rough_ms(fn, input_sets)
    per_batch = int(min(1000, max(1, math.ceil(self.batch_ms / max(rough, 1e-3)))))
    batches = max(3, min(self.batches, reps_for(rough * per_batch, self.budget_ms)))
    samples, n = [], 0
    for _ in range(batches):
      start = time.perf_counter()
      for _ in range(per_batch):
        out = fn(*input_sets[n % len(input_sets)])
        n += 1
      jax.block_until_ready(out)
      samples.append((time.perf_counter() - start) * 1e3 / per_batch)
    return summarize(samples, f"{self.name}(R={per_batch})")


TIMER_NAMES = ("auto", "cupti", "wallclock")


def cupti_works() -> bool:
  """CUPTI is there and records a kernel (it can be refused, e.g. under another profiler)."""
  ext = cupti_extension()
  if ext is None:
    return False
  tiny = jax.jit(lambda v: v + 1)
  sets = [(jnp.ones((1,), jnp.float32),)]
  try:
    jax.block_until_ready(tiny(*sets[0]))
    return bool(cupti_records(ext, tiny, sets, 2))
  except Exception:
    return False


def make_timer(name: str = "auto", reps: int | None = None, budget_ms: float = 300.0) -> Timer:
  if name not in TIMER_NAMES:
    raise ValueError(f"timer: expected one of {TIMER_NAMES}, got {name!r}")
  if name == "auto":
    name = "cupti" if cupti_works() else "wallclock"
  if name == "cupti":
    return CuptiTimer(budget_ms=budget_ms, reps=reps)
  return WallclockTimer(budget_ms=budget_ms)
