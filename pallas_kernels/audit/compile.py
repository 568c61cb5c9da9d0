"""Compile one Triton IR module with the triton wheel, and read what the GPU would have to give it.

Runs in worker processes (it imports triton, never jax). For every kernel:
- `triton.compile(path.ttir, target=GPUTarget("cuda", cc, 32), options=...)` -> PTX and cubin;
- ptxas's own `-v` report (Triton runs ptxas with `-v`; `TRITON_DUMP_PTXAS_LOG=1` makes it print
  the report, captured here): registers, spill stores/loads, stack frame, static shared memory;
- `cuobjdump --dump-resource-usage` on the cubin (REG, STACK, SHARED, LOCAL): a cross-check, and
  the source of the figures if a triton release stops printing the ptxas report;
- `metadata.shared`: the dynamic shared memory Triton asks for at launch;
- tensor-core instructions in the PTX: `wgmma.mma_async` (Hopper), `mma.sync` (Ampere and later).
Every compile uses a fresh Triton cache directory, so ptxas always runs and reports.

The Triton IR text comes from jaxlib's (older) Triton dialect; when the wheel cannot parse it
as printed, `ttir_compat` rewrites the known differences and the compile is retried once.
MLIR's parse diagnostics go to the process's stderr (C++), so they are captured from fd 2 and
put into the error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pallas_kernels.audit import ttir_compat

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_WGMMA = re.compile(r"\bwgmma\.mma_async\b")
_MMA = re.compile(r"\bmma\.sync\b")


@dataclasses.dataclass(frozen=True)
class CompileJob:
  name: str
  ttir: str
  compute_capability: int  # 80, 90
  num_warps: int
  num_stages: int
  keep_prefix: str | None = None  # write <prefix>.ttir/.ttgir/.ptx/.cubin when set


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one compiled kernel needs per thread and per block."""

  registers: int
  spill_store_bytes: int
  spill_load_bytes: int
  stack_bytes: int
  local_bytes: int
  shared_dynamic_bytes: int   # Triton's launch-time request (metadata.shared)
  shared_static_bytes: int    # declared in the cubin
  wgmma: int                  # instructions in the PTX
  mma_sync: int
  compile_s: float
  source: str                 # "ptxas -v" or "cuobjdump" (spills then = stack frame)

  @property
  def shared_bytes(self) -> int:
    return self.shared_dynamic_bytes + self.shared_static_bytes

  @property
  def spill_bytes(self) -> int:
    return self.spill_store_bytes + self.spill_load_bytes


def _tool(name: str) -> str:
  import triton
  return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@contextlib.contextmanager
def _fresh_triton_env(cache_dir: str):
  """ptxas prints its report, every time (no cache hit), into a throwaway cache."""
  settings = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1",
              "TRITON_CACHE_DIR": cache_dir}
  saved = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@contextlib.contextmanager
def _native_stderr(path: Path):
  """Send fd 2 (where MLIR's C++ diagnostics go) to `path` for the duration."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "w") as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


class ParseError(RuntimeError):
  pass


def _compile_text(ttir: str, job: CompileJob, workdir: str):
  """(compiled kernel, captured ptxas report); ParseError carries MLIR's diagnostics."""
  import triton
  from triton.backends.compiler import GPUTarget
  src = Path(workdir) / f"{job.name}.ttir"
  src.write_text(ttir)
  # enable_fp_fusion=True is Triton's default (FMA contraction); explicit to silence 3.9's notice.
  options = dict(num_warps=job.num_warps, num_stages=job.num_stages, enable_fp_fusion=True)
  log, diagnostics = io.StringIO(), Path(workdir) / "stderr.txt"
  try:
    with (_fresh_triton_env(str(Path(workdir) / "cache")), contextlib.redirect_stdout(log),
          _native_stderr(diagnostics)):
      kernel = triton.compile(str(src), target=GPUTarget("cuda", job.compute_capability, 32),
                              options=options)
  except Exception as e:
    native = diagnostics.read_text().strip()
    if "Parse MLIR" in str(e):
      raise ParseError(f"{e} {native}") from None
    if native:  # an MLIR pass or LLVM said why on fd 2
      raise RuntimeError(f"{type(e).__name__}: {e}\n{native[-2000:]}") from e
    raise
  return kernel, log.getvalue()


def _triton_compile(job: CompileJob, workdir: str):
  try:
    return _compile_text(job.ttir, job, workdir)
  except ParseError:
    if not ttir_compat.has_old_cache_hints(job.ttir):
      raise
  return _compile_text(ttir_compat.new_cache_hints(job.ttir), job, workdir)


def _cuobjdump(cubin_path: Path) -> dict[str, int]:
  out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin_path)],
                       capture_output=True, text=True, check=True).stdout
  match = _CUOBJDUMP.search(out)
  if match is None:
    raise RuntimeError(f"cuobjdump printed no resource usage for {cubin_path}:\n{out}")
  return dict(zip(("reg", "stack", "shared", "local"), map(int, match.groups())))


def _keep(prefix: str, kernel) -> None:
  Path(prefix).parent.mkdir(parents=True, exist_ok=True)
  for stage in ("ttir", "ttgir", "ptx"):
    Path(f"{prefix}.{stage}").write_text(kernel.asm[stage])
  Path(f"{prefix}.cubin").write_bytes(kernel.asm["cubin"])


def _resources(kernel, ptxas_log: str, usage: dict[str, int], compile_s: float) -> Resources:
  ptx = kernel.asm["ptx"]
  regs = _PTXAS_REGS.search(ptxas_log)
  spills = _PTXAS_SPILLS.search(ptxas_log)
  smem = _PTXAS_SMEM.search(ptxas_log)
  if regs and spills:
    stack, stores, loads = map(int, spills.groups())
    registers, source = int(regs.group(1)), "ptxas -v"
  else:  # no report: a stack frame in a Triton kernel is spilling, count it as such
    stack = stores = loads = usage["stack"]
    registers, source = usage["reg"], "cuobjdump"
  return Resources(
      registers=registers, spill_store_bytes=stores, spill_load_bytes=loads, stack_bytes=stack,
      local_bytes=usage["local"], shared_dynamic_bytes=int(kernel.metadata.shared),
      shared_static_bytes=int(smem.group(1)) if smem else usage["shared"],
      wgmma=len(_WGMMA.findall(ptx)), mma_sync=len(_MMA.findall(ptx)),
      compile_s=compile_s, source=source)


def compile_kernel(job: CompileJob) -> Resources:
  """Compile `job` for its compute capability and read its resource usage."""
  with tempfile.TemporaryDirectory(prefix="pallax-audit-") as workdir:
    start = time.perf_counter()
    kernel, ptxas_log = _triton_compile(job, workdir)
    compile_s = time.perf_counter() - start
    cubin = Path(workdir) / f"{job.name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = _cuobjdump(cubin)
    if job.keep_prefix:
      _keep(job.keep_prefix, kernel)
    return _resources(kernel, ptxas_log, usage, compile_s)


def toolchain() -> str:
  """'triton 3.9.0' for the table footer."""
  import triton
  return f"triton {triton.__version__}"
