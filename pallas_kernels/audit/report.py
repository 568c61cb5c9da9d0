"""Audit rows: occupancy estimate, the thresholds that fail the audit, the tables and JSON.

Two kinds of row: `Row` (a Triton kernel, compiled: registers, spills, occupancy) and
`MosaicRow` (a Mosaic GPU kernel, lowered only: what its payload declares). Each has its own
table; both fail the audit through `problems`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pallas_kernels.audit.compile import Resources
from pallas_kernels.audit.mosaic import MosaicKernel
from pallas_kernels.audit.targets import TARGETS, GpuTarget


@dataclasses.dataclass(frozen=True)
class Occupancy:
  blocks_per_sm: int
  warps_per_sm: int
  percent: float              # of the SM's maximum resident warps
  limiter: str                # what caps it: "regs", "smem", "warps" or "blocks" (per SM)


def _round_up(value: int, unit: int) -> int:
  return -(-value // unit) * unit


def occupancy(target: GpuTarget, num_warps: int, registers: int, shared_bytes: int) -> Occupancy:
  """Resident blocks per SM, as the CUDA occupancy calculator counts them."""
  regs_per_warp = _round_up(max(registers, 1) * 32, target.register_alloc_unit)
  limits = {
      "warps": target.max_warps_per_sm // num_warps,
      "blocks": target.max_blocks_per_sm,
      "regs": (target.registers_per_sm // regs_per_warp) // num_warps,
  }
  if shared_bytes:
    per_block = _round_up(shared_bytes + target.reserved_shared_per_block, target.shared_alloc_unit)
    limits["smem"] = target.shared_per_sm // per_block
  limiter = min(limits, key=limits.get)
  blocks = limits[limiter]
  warps = blocks * num_warps
  return Occupancy(blocks, warps, 100.0 * warps / target.max_warps_per_sm, limiter)


@dataclasses.dataclass
class Row:
  """One kernel of one case on one target."""

  op: str
  case: str
  kernel: str
  target: str                     # "sm80", "sm90"
  num_warps: int | None = None
  num_stages: int | None = None
  grid: tuple[int, ...] | None = None
  num_dots: int = 0
  resources: Resources | None = None
  occupancy: Occupancy | None = None
  error: str | None = None        # failed to lower or compile
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def tensor_cores(self) -> str:
    """'yes (wgmma)', 'yes (mma)', 'no', or 'n.a.' (no tt.dot, or nothing compiled)."""
    r = self.resources
    if r is None or not self.num_dots:
      return "n.a."
    if r.wgmma:
      return "yes (wgmma)"
    return "yes (mma)" if r.mma_sync else "no"

  @property
  def status(self) -> str:
    return _status(self.error, self.problems)


def _status(error: str | None, problems: list[str]) -> str:
  if error:
    return "ERROR"
  return "FAIL: " + "; ".join(problems) if problems else "ok"


def check(row: Row) -> list[str]:
  """The audit's thresholds. Any problem fails the audit; an error is one."""
  if row.error:
    return [row.error]
  r, target = row.resources, TARGETS[row.target]
  problems = []
  if r.spill_bytes:
    problems.append(f"spills ({r.spill_store_bytes} B stored, {r.spill_load_bytes} B loaded"
                    f"{', from stack size' if r.source == 'cuobjdump' else ''})")
  if r.shared_bytes > target.max_shared_per_block:
    problems.append(f"shared memory {_kb(r.shared_bytes)} > {_kb(target.max_shared_per_block)} "
                    f"per block on {target.sm}")
  if row.num_dots and not (r.wgmma or r.mma_sync):
    problems.append(f"{row.num_dots} tt.dot without a tensor-core instruction")
  return problems


def finish(row: Row) -> Row:
  """Fill the derived fields (occupancy, problems) once resources or an error are known."""
  if row.resources is not None and not row.error:
    row.occupancy = occupancy(TARGETS[row.target], row.num_warps, row.resources.registers,
                              row.resources.shared_bytes)
  row.problems = check(row)
  return row


def failed(rows: list[Row]) -> bool:
  return any(row.problems for row in rows)


def _kb(n: int) -> str:
  if n < 1024:
    return f"{n} B"
  return f"{n / 1024:.1f} KB" if n % 1024 else f"{n // 1024} KB"


def _cells(row: Row) -> list[str]:
  r, occ = row.resources, row.occupancy
  spills = "-" if r is None else "0"
  if r is not None and r.spill_bytes:
    spills = f"{r.spill_store_bytes}/{r.spill_load_bytes} B"
  return [row.op, row.case, row.kernel, row.target,
          "-" if row.num_warps is None else str(row.num_warps),
          "-" if row.num_stages is None else str(row.num_stages),
          "-" if r is None else str(r.registers), spills,
          "-" if r is None else _kb(r.shared_bytes),
          "-" if occ is None else f"{occ.warps_per_sm}w {occ.percent:.0f}% ({occ.limiter})",
          row.tensor_cores, row.status]


HEADER = ["op", "case", "kernel", "target", "warps", "stages", "regs", "spills", "smem",
          "occupancy/SM", "tensor cores", "status"]


def table(rows: list[Row]) -> str:
  lines = [HEADER] + [_cells(row) for row in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]

  def fmt(line):
    return "  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1]
  rule = "-" * (sum(widths) + 2 * len(widths) + 6)
  return "\n".join([fmt(HEADER), rule, *(fmt(line) for line in lines[1:])])


def footer(toolchain: str) -> str:
  return "\n".join([
      f"Compiled offline with the {toolchain} wheel's compiler and ptxas. XLA compiles the",
      "same Triton IR with its own bundled Triton at run time, so these figures are a close",
      "proxy, not a guarantee: confirm on a GPU. spills = ptxas spill stores/loads per thread;",
      "smem = dynamic + static shared memory per block; occupancy = resident warps per SM (of",
      "64) from registers, shared memory and threads, with the limiting factor; tensor cores =",
      "wgmma/mma.sync in the PTX of a kernel whose Triton IR has a tt.dot (n.a. without one).",
  ])


def failures(rows: list[Row]) -> list[str]:
  """One line per failing row, with the full problem (an error's message included)."""
  return [f"{row.op} | {row.case} | {row.kernel} | {row.target}: " + "; ".join(row.problems)
          for row in rows if row.problems]


def to_json(row: Row) -> dict:
  d = dataclasses.asdict(row)
  d.update(tensor_cores=row.tensor_cores, status=row.status)
  if row.resources is not None:
    d["resources"]["shared_bytes"] = row.resources.shared_bytes
  return d


def write_json(path: str | Path, rows: list[Row], meta: dict,
               mosaic_rows: list[MosaicRow] = ()) -> None:
  payload = {**meta, "failed": failed(rows) or failed(mosaic_rows),
             "rows": [to_json(r) for r in rows],
             "mosaic_rows": [mosaic_to_json(r) for r in mosaic_rows]}
  Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ---- Mosaic GPU rows ----------------------------------------------------------------------------

REGISTERS_OFFLINE = ("n/a offline: jaxlib compiles a Mosaic GPU payload to PTX and a cubin only "
                     "in its CUDA plugin (on a GPU: MOSAIC_GPU_DUMP_PTXAS=1)")


@dataclasses.dataclass
class MosaicRow:
  """One Mosaic GPU kernel of one case on one target: lowered, not compiled."""

  op: str
  case: str
  kernel: str
  target: str
  payload: MosaicKernel | None = None
  wgmma_expected: bool = False
  lower_s: float | None = None    # lowering + reading the payload
  not_applicable: str | None = None  # why no kernel: target unsupported, or none in a gradient
  error: str | None = None
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def status(self) -> str:
    if self.not_applicable:
      return f"not applicable: {self.not_applicable}"
    return _status(self.error, self.problems)


def check_mosaic(row: MosaicRow) -> list[str]:
  """What fails a Mosaic row. Registers and spills are unknown offline and fail nothing."""
  if row.error:
    return [row.error]
  k, target = row.payload, TARGETS[row.target]
  if row.not_applicable or k is None:
    return []
  problems = []
  if k.arch is not None and k.arch != divmod(target.compute_capability, 10):
    problems.append(f"payload lowered for sm_{k.arch[0]}{k.arch[1]}, not {target.sm}")
  if k.smem_bytes > target.max_shared_per_block:
    problems.append(f"shared memory {_kb(k.smem_bytes)} > {_kb(target.max_shared_per_block)} "
                    f"per block on {target.sm}")
  if row.wgmma_expected and not k.wgmma:
    problems.append(f"no wgmma in the payload (a {row.op} kernel should run its products on "
                    f"tensor cores)")
  return problems


def finish_mosaic(row: MosaicRow) -> MosaicRow:
  row.problems = check_mosaic(row)
  return row


def _dims(dims: tuple | None) -> str:
  return "-" if dims is None else "x".join("?" if d is None else str(d) for d in dims)


def _mosaic_cells(row: MosaicRow) -> list[str]:
  k = row.payload
  if k is None:
    return [row.op, row.case, row.kernel, row.target] + ["-"] * 9 + [row.status]
  return [row.op, row.case, row.kernel, row.target, _dims(k.grid), _dims(k.cluster),
          f"{k.warpgroups} ({k.threads})" if k.threads else "?",
          "/".join(map(str, k.max_registers)) or "-", "n/a offline", _kb(k.smem_bytes),
          str(k.wgmma) if k.wgmma else "no", f"{k.tma_loads}/{k.tma_stores}", str(k.mbarrier),
          row.status]


MOSAIC_HEADER = ["op", "case", "kernel", "target", "grid", "cluster", "wgs (thr)", "setmaxnreg",
                 "regs/spills", "smem", "wgmma", "TMA ld/st", "mbarrier", "status"]


def mosaic_table(rows: list[MosaicRow]) -> str:
  lines = [MOSAIC_HEADER] + [_mosaic_cells(row) for row in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(MOSAIC_HEADER) - 1)]

  def fmt(line):
    return "  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1]
  rule = "-" * (sum(widths) + 2 * len(widths) + 6)
  return "\n".join([fmt(MOSAIC_HEADER), rule, *(fmt(line) for line in lines[1:])])


def mosaic_footer() -> str:
  return "\n".join([
      'Mosaic GPU kernels (impl="mosaic"), lowered for CUDA, not compiled: figures from the',
      "mosaic_gpu_v2 custom call's payload (NVVM-level MLIR). grid/cluster/threads and smem from",
      "its gpu.launch (smem = dynamicSharedMemorySize: all of a Mosaic kernel's shared memory);",
      "wgmma, TMA (cp.async.bulk.tensor loads/stores) and mbarrier = ops in the payload (static",
      "counts); setmaxnreg = per-warpgroup register caps the kernel sets. regs/spills: n/a",
      "offline: jaxlib compiles a Mosaic GPU payload to PTX and a cubin only in its CUDA plugin",
      "(on a GPU: MOSAIC_GPU_DUMP_PTXAS=1). Hopper-only kernels get an sm80 row 'not applicable'.",
  ])


def mosaic_to_json(row: MosaicRow) -> dict:
  d = {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "payload"}
  k = row.payload
  if k is not None:
    d["payload"] = {f.name: getattr(k, f.name) for f in dataclasses.fields(k)
                    if f.name != "bytecode"}
    d["payload"].update(threads=k.threads, warpgroups=k.warpgroups)
  d.update(registers=REGISTERS_OFFLINE, status=row.status)
  return d


