"""One case: our kernels and every peer, checked against the xla reference, then timed."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pallas_kernels.bench import check, roofline, timing
from pallas_kernels.bench.registry import OpFolder, short_error

# Our implementations, in report order; each is the public op with this `impl=`.
OUR_IMPLS = ("triton", "mosaic")
OURS_PREFIX = "pallax-"
NOT_OFFERED = "is not implemented for this op"  # dispatch's words for an impl the op lacks

# Row statuses. Only "ok" rows compete for best peer.
OK, WRONG, UNCHECKED, REFUSED, ERROR = "ok", "wrong", "unchecked", "refused", "error"


@dataclasses.dataclass
class Row:
  op: str
  case: str
  impl: str
  kind: str                        # "ours" or "peer"
  status: str = ERROR
  ms: float | None = None          # median device time of one call
  min_ms: float | None = None
  p10_ms: float | None = None
  p90_ms: float | None = None
  reps: int | None = None
  timing: str | None = None        # timer method
  tflops: float | None = None
  gbps: float | None = None
  roofline_fraction: float | None = None
  bound: str | None = None         # which ceiling sets the floor: "compute" or "memory"
  rel_err: float | None = None     # against the xla reference
  tolerance: float | None = None
  vs_best_peer: float | None = None  # best peer's time / this time: > 1 is faster than it
  compile_s: float | None = None
  flops: float = 0.0
  bytes_moved: float = 0.0
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class Contender:
  name: str
  kind: str
  fn: Callable         # fn(*inputs): one input set of the case, positionally
  config: Any = None   # the explicit config autotune passes, for the timer's `what`


def contenders(folder: OpFolder, case, peers: dict[str, Callable]) -> list[Contender]:
  """Our impls (the public op with each `impl=`), then the peers."""
  public = folder.public_fn(case.op)
  ours = [Contender(OURS_PREFIX + impl, "ours",
                    folder.bound(case, functools.partial(public, impl=impl)))
          for impl in OUR_IMPLS]
  return ours + [Contender(name, "peer", folder.bound(case, fn)) for name, fn in peers.items()]


def reference_fn(folder: OpFolder, case, peers: dict[str, Callable]) -> Callable:
  """The op's "xla" peer, else the public op with impl="xla"."""
  if "xla" in peers:
    return folder.bound(case, peers["xla"])
  return folder.bound(case, functools.partial(folder.public_fn(case.op), impl="xla"))


def fill_speed(row: Row, t: timing.Timing, roof: roofline.Roofline | None) -> None:
  row.ms, row.min_ms, row.p10_ms, row.p90_ms = t.median_ms, t.min_ms, t.p10_ms, t.p90_ms
  row.reps, row.timing = t.reps, t.method
  if row.flops:
    row.tflops = roofline.tflops(row.flops, t.median_ms)
  if row.bytes_moved:
    row.gbps = roofline.gbps(row.bytes_moved, t.median_ms)
  if roof is not None and (row.flops or row.bytes_moved):
    row.roofline_fraction = roofline.fraction(t.median_ms, row.flops, row.bytes_moved, roof)
    row.bound = roofline.floor_time_ms(row.flops, row.bytes_moved, roof)[1]


def run_contender(c: Contender, case, input_sets: Sequence[tuple], ref_leaves, timer,
                  roof: roofline.Roofline | None, rtol: float | None = None) -> Row | None:
  """Trace (refusals surface here), compile and check, then time. None: impl not offered."""
  row = Row(case.op, case.label, c.name, c.kind, flops=case.flops, bytes_moved=case.bytes_moved)
  jitted = jax.jit(c.fn)
  try:
    jax.eval_shape(c.fn, *input_sets[0])
  except (ValueError, TypeError, NotImplementedError) as exc:
    if NOT_OFFERED in str(exc):
      return None
    row.status, row.error = REFUSED, short_error(exc)
    return row
  except Exception as exc:
    row.error = short_error(exc)
    return row
  try:
    start = time.perf_counter()
    out = jax.block_until_ready(jitted(*input_sets[0]))
    row.compile_s = time.perf_counter() - start
    if ref_leaves is None:
      row.status = UNCHECKED
    else:
      row.rel_err, row.tolerance, passed = check.verdict(out, ref_leaves, rtol)
      row.status = OK if passed else WRONG
    del out
    what = {"case": case.label, "impl": c.name, "config": c.config}
    fill_speed(row, timer(jitted, input_sets, what), roof)
  except Exception as exc:  # compile failure, OOM, timer failure: recorded, never fatal
    row.status, row.error = ERROR, short_error(exc)
  return row


def rank_against_peers(rows: list[Row]) -> None:
  """vs_best_peer for every timed row, against the fastest peer that passed the gate."""
  peer_ms = [r.ms for r in rows if r.kind == "peer" and r.status == OK and r.ms]
  if not peer_ms:
    return
  best = min(peer_ms)
  for r in rows:
    if r.ms:
      r.vs_best_peer = best / r.ms


def run_case(folder: OpFolder, case, timer, roof: roofline.Roofline | None, *,
             rtol: float | None = None, rotate_bytes: int = timing.ROTATE_BYTES,
             log: Callable[[str], Any] = print) -> list[Row]:
  rows = []
  try:
    peers = folder.peers()
  except Exception as exc:  # a broken peers() costs its peers, not the case
    peers = {}
    rows.append(Row(case.op, case.label, "peers()", "peer", error=short_error(exc)))
  input_sets = timing.make_input_sets(case, rotate_bytes)
  try:
    ref_leaves = check.to_host(jax.jit(reference_fn(folder, case, peers))(*input_sets[0]))
  except Exception as exc:
    ref_leaves = None
    log(f"  reference failed, outputs unchecked: {short_error(exc)}")
  for c in contenders(folder, case, peers):
    row = run_contender(c, case, input_sets, ref_leaves, timer, roof, rtol)
    if row is not None:
      rows.append(row)
      log("  " + summary_line(row))
  rank_against_peers(rows)
  return rows


def summary_line(row: Row) -> str:
  if row.ms is None:
    return f"{row.impl:<22} {row.status:<9} {row.error or ''}"[:240]
  frac = "" if row.roofline_fraction is None else f" {100 * row.roofline_fraction:5.1f}% roof"
  err = "" if row.rel_err is None else f" err {row.rel_err:.1e}"
  return f"{row.impl:<22} {row.status:<9} {row.ms:9.4f} ms{frac}{err}"
