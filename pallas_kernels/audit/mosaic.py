"""Get the Mosaic GPU kernels out of a jax function lowered for CUDA, and read their payload.

A Pallas Mosaic GPU kernel lowers to a `stablehlo.custom_call` to `mosaic_gpu_v2` whose
`mhlo.backend_config` dictionary carries `module`: the kernel as MLIR *bytecode*, already
lowered to the NVVM/LLVM level (TMA, mbarriers and wgmma spelled out), serialized by Mosaic's
`mosaic_gpu-serde` pass (ops renamed `stable_mosaic_gpu.*`). Here it is parsed back with
jaxlib's MLIR and deserialized with the same pass, then read:

- `gpu.launch` (one per kernel): grid, cluster and block sizes, and `dynamicSharedMemorySize`,
  the SMEM the kernel asks for at launch. Mosaic GPU carves *all* of a kernel's shared memory
  (buffers, barriers, reduction scratch) out of that dynamic buffer: it is the figure its
  lowering checks against 227 KB, and the one reported (`smem_source`). A static SMEM global
  (`llvm.mlir.global` in address space 3), which Mosaic does not emit today, would be added.
- Tensor-core and async-copy instructions: `wgmma.mma_async` (emitted as inline PTX, so
  counted in `llvm.inline_asm` strings, or as `nvvm.wgmma.mma_async` ops), TMA
  (`nvvm.cp.async.bulk.tensor.*` ops, or inline `cp.async.bulk.tensor` PTX as jax 0.12 emits
  its loads: loads into SMEM, stores from it), mbarrier operations
  (`nvvm.mbarrier.*` ops and inline `mbarrier.*` PTX), and `setmaxnreg` register caps.
- `mosaic_gpu.arch_major/minor` on the module: the architecture the payload was lowered for.

Registers and spills are not readable offline: jaxlib turns the payload into PTX and a cubin
only inside its CUDA plugin (`MOSAIC_GPU_DUMP_PTXAS=1` prints ptxas -v on a GPU machine).
Checked with jax/jaxlib 0.11.2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

from jax._src.lib.mlir import ir, passmanager

from pallas_kernels.audit.lowering import _walk

MOSAIC_CALL_TARGET = "mosaic_gpu_v2"
SMEM_SOURCE = "gpu.launch dynamicSharedMemorySize"
_WGMMA = re.compile(r"\bwgmma\.mma_async\b")
_MBARRIER = re.compile(r"\bmbarrier\.")
_SETMAXNREG = re.compile(r"\bsetmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)")
_TMA_OP = "nvvm.cp.async.bulk.tensor."
# jax 0.12 emits TMA loads as inline PTX instead of the nvvm op (stores stay nvvm ops).
_TMA_LOAD_ASM = re.compile(r"\bcp\.async\.bulk\.tensor\.\d+d\.shared::\w+\.global\b")
_TMA_STORE_ASM = re.compile(r"\bcp\.async\.bulk\.tensor\.\d+d\.global\.shared::")
_SHARED_ADDRESS_SPACE = 3
_LLVM_ARRAY = re.compile(r"!llvm\.array<(\d+) x i(\d+)>")


@dataclasses.dataclass(frozen=True)
class MosaicKernel:
  """One `mosaic_gpu_v2` custom call: what its payload declares."""

  name: str                           # the payload module's sym_name (the kernel_name)
  grid: tuple[int | None, ...]        # gpu.launch grid (x, y, z); None where not a constant
  cluster: tuple[int | None, ...]     # (1, 1, 1) without clusters
  block: tuple[int | None, ...]       # threads per block (x, y, z)
  smem_bytes: int
  smem_source: str
  arch: tuple[int, int] | None        # (9, 0): what the payload was lowered for
  wgmma: int                          # wgmma.mma_async instructions
  tma_loads: int                      # cp.async.bulk.tensor global -> shared
  tma_stores: int                     # shared -> global (and reductions)
  mbarrier: int                       # mbarrier ops (init, arrive, expect_tx, wait)
  max_registers: tuple[int, ...]      # setmaxnreg caps, in program order
  bytecode: bytes = dataclasses.field(default=b"", repr=False, compare=False)

  @property
  def threads(self) -> int | None:
    return None if None in self.block else math.prod(self.block)

  @property
  def warpgroups(self) -> int | None:
    return None if self.threads is None else self.threads // 128


@functools.cache
def _context() -> ir.Context:
  """An MLIR context of jaxlib's with the Mosaic GPU dialect (and its serde pass)."""
  from jax._src.interpreters import mlir
  from jax.experimental.mosaic import gpu as mgpu
  ctx = mlir.make_ir_context()
  mgpu.dialect.register_dialect(ctx)
  ctx.allow_unregistered_dialects = True  # the serialized `stable_mosaic_gpu.*` ops
  return ctx


def payload_module(bytecode: bytes) -> ir.Module:
  """The custom call's `module` bytecode -> the kernel module, deserialized (nvvm.*, gpu.*)."""
  ctx = _context()
  module = ir.Module.parse(bytecode, context=ctx)
  passmanager.PassManager.parse("builtin.module(mosaic_gpu-serde{serialize=false})",
                                context=ctx).run(module.operation)
  return module


def payload_text(bytecode: bytes) -> str:
  return payload_module(bytecode).operation.get_asm(enable_debug_info=False)


def _constant(value: ir.Value | None, default: int | None = None) -> int | None:
  if value is None:
    return default
  owner = value.owner
  if isinstance(owner, ir.Block):
    return None
  op = getattr(owner, "operation", owner)
  if op.name in ("arith.constant", "llvm.mlir.constant"):
    return ir.IntegerAttr(op.attributes["value"]).value
  return None


def _static_shared_bytes(op: ir.Operation) -> int:
  """An SMEM global's size; an unknown type raises (the row then reports the error)."""
  attrs = op.attributes
  if "addr_space" not in attrs or ir.IntegerAttr(attrs["addr_space"]).value != \
      _SHARED_ADDRESS_SPACE:
    return 0
  global_type = str(ir.TypeAttr(attrs["global_type"]).value)
  match = _LLVM_ARRAY.fullmatch(global_type)
  if match is None:
    raise ValueError(f"shared-memory global of unknown size: {global_type}")
  return int(match.group(1)) * int(match.group(2)) // 8


def _tma_kind(direction: str) -> str | None:
  """`nvvm.cp.async.bulk.tensor.<direction>`: into SMEM (load), out of it (store), prefetch."""
  if direction.startswith(("shared", "g2s")):
    return "tma_loads"
  return None if direction.startswith("prefetch") else "tma_stores"


def _int_attr(module: ir.Module, name: str) -> int | None:
  attrs = module.operation.attributes
  return ir.IntegerAttr(attrs[name]).value if name in attrs else None


def analyze(bytecode: bytes) -> MosaicKernel:
  """Read one payload (the custom call's `module`)."""
  module = payload_module(bytecode)
  launches, asm = [], []
  counts = dict(wgmma=0, tma_loads=0, tma_stores=0, mbarrier=0)
  static_smem = 0
  for op in _walk(module.operation):
    name = op.name
    if name == "gpu.launch":
      launches.append(op)
    elif name == "llvm.inline_asm":
      asm.append(ir.StringAttr(op.attributes["asm_string"]).value)
    elif name.startswith(_TMA_OP):
      kind = _tma_kind(name[len(_TMA_OP):])
      if kind:
        counts[kind] += 1
    elif name.startswith("nvvm.mbarrier."):
      counts["mbarrier"] += 1
    elif name.startswith("nvvm.wgmma.mma_async"):
      counts["wgmma"] += 1
    elif name == "llvm.mlir.global":
      static_smem += _static_shared_bytes(op)
  if len(launches) != 1:
    raise ValueError(f"Mosaic GPU payload with {len(launches)} gpu.launch ops, expected 1")
  launch = launches[0].opview
  counts["wgmma"] += sum(len(_WGMMA.findall(s)) for s in asm)
  counts["mbarrier"] += sum(len(_MBARRIER.findall(s)) for s in asm)
  counts["tma_loads"] += sum(len(_TMA_LOAD_ASM.findall(s)) for s in asm)
  counts["tma_stores"] += sum(len(_TMA_STORE_ASM.findall(s)) for s in asm)
  caps = tuple(int(m) for s in asm for m in _SETMAXNREG.findall(s))
  dynamic = _constant(launch.dynamicSharedMemorySize, default=0)
  if dynamic is None:
    raise ValueError("gpu.launch's dynamicSharedMemorySize is not a constant")
  major, minor = (_int_attr(module, f"mosaic_gpu.arch_{part}") for part in ("major", "minor"))
  attrs = module.operation.attributes
  return MosaicKernel(
      name=ir.StringAttr(attrs["sym_name"]).value if "sym_name" in attrs else "-",
      grid=tuple(_constant(getattr(launch, f"gridSize{d}")) for d in "XYZ"),
      cluster=tuple(_constant(getattr(launch, f"clusterSize{d}"), default=1) for d in "XYZ"),
      block=tuple(_constant(getattr(launch, f"blockSize{d}")) for d in "XYZ"),
      smem_bytes=dynamic + static_smem,
      smem_source=SMEM_SOURCE + (" + static SMEM globals" if static_smem else ""),
      arch=None if major is None else (major, minor or 0),
      max_registers=caps, bytecode=bytecode, **counts)


def _is_mosaic_call(op: ir.Operation) -> bool:
  return (op.name == "stablehlo.custom_call"
          and ir.StringAttr(op.attributes["call_target_name"]).value == MOSAIC_CALL_TARGET)


def _payload(op: ir.Operation) -> bytes:
  if "mhlo.backend_config" not in op.attributes:
    raise ValueError(f"{MOSAIC_CALL_TARGET} custom call without `mhlo.backend_config`")
  config = ir.DictAttr(op.attributes["mhlo.backend_config"])
  return ir.StringAttr(config["module"]).value_bytes


def mosaic_payloads(lowered) -> list[bytes]:
  """The payload bytecode of every Mosaic GPU kernel in a `jax.stages.Lowered`, in order."""
  module = lowered.compiler_ir("stablehlo")
  return [_payload(op) for op in _walk(module.operation) if _is_mosaic_call(op)]


def mosaic_kernels(lowered) -> list[MosaicKernel]:
  return [analyze(payload) for payload in mosaic_payloads(lowered)]
