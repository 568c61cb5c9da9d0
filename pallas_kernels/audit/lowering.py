"""Get the Triton kernels out of a jax function lowered for CUDA, as Triton IR text.

The Pallas Triton path lowers each `pallas_call` to a `stablehlo.custom_call` to
`__gpu$xla.gpu.triton` whose `mhlo.backend_config` dictionary carries the kernel's
`name`, `num_warps`, `num_stages`, `grid_x/y/z` and, in `ir`, the Triton module as MLIR
*bytecode* written by jaxlib's MLIR (the producer string reads e.g. "MLIR24.0.0git").

How the text is obtained, and why this way:
- The bytecode is parsed back with jaxlib's own MLIR (the same build that wrote it, with
  jaxlib's Triton dialect registered, as `jax._src.pallas.triton.lowering` registers it) and
  printed as text without locations. The triton wheel then parses that text. Feeding the
  bytecode straight to the wheel is not an option: `triton.compile` reads a `.ttir` path as
  UTF-8 text, and bytecode written by a different MLIR build is not guaranteed readable.
- Printing with `enable_debug_info=False` gives clean IR; the text `pallas_call(debug=True)`
  prints carries pretty location annotations the parser rejects (GPU-OFFLINE.md, section 3).
- Walking the lowered StableHLO finds every kernel, including several per op (e.g. split-K
  plus a reduction kernel) and kernels nested in called functions or loops, exactly as XLA
  would receive them. Re-lowering the jaxpr ourselves would need pallas_call internals.
Checked with jax/jaxlib 0.11.2 and the triton 3.9.0 wheel: the printed text of jaxlib's Triton
dialect parses in the wheel's (`tt.dot ... inputPrecision = tf32` on bf16 operands included).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

from jax._src.lib.mlir import ir

TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"
_DOT = re.compile(r"\btt\.dot(_scaled)?\b")


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One `pallas_call` as XLA receives it."""

  name: str
  ttir: str                   # Triton IR text, no locations
  num_warps: int
  num_stages: int
  grid: tuple[int, int, int]

  @property
  def num_dots(self) -> int:
    """`tt.dot` ops: the kernel should run them on tensor cores."""
    return len(_DOT.findall(self.ttir))

  @property
  def digest(self) -> str:
    key = f"{self.num_warps}/{self.num_stages}\n{self.ttir}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.cache
def _triton_context() -> ir.Context:
  """An MLIR context of jaxlib's with the Triton dialect loaded."""
  try:
    from jax._src.pallas.triton import lowering as triton_lowering
    return triton_lowering._new_ir_context()  # noqa: SLF001 (the context jax itself writes with)
  except (ImportError, AttributeError):
    from jax._src.interpreters import mlir
    from jax._src.lib.triton import dialect as tt_dialect
    ctx = mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    return ctx


def ttir_text(bytecode: bytes) -> str:
  """Triton IR bytecode (from the custom call) -> text the triton wheel can parse."""
  module = ir.Module.parse(bytecode, context=_triton_context())
  return module.operation.get_asm(enable_debug_info=False)


def _walk(op: ir.Operation):
  yield op
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield from _walk(child.operation)


def _backend_config(op: ir.Operation) -> ir.DictAttr:
  if "mhlo.backend_config" in op.attributes:
    return ir.DictAttr(op.attributes["mhlo.backend_config"])
  raise ValueError(f"{TRITON_CALL_TARGET} custom call without `mhlo.backend_config`: {op}")


def _int(config: ir.DictAttr, key: str) -> int:
  return ir.IntegerAttr(config[key]).value


def _kernel(op: ir.Operation) -> TritonKernel:
  config = _backend_config(op)
  return TritonKernel(
      name=ir.StringAttr(config["name"]).value,
      ttir=ttir_text(ir.StringAttr(config["ir"]).value_bytes),
      num_warps=_int(config, "num_warps"),
      num_stages=_int(config, "num_stages"),
      grid=tuple(_int(config, f"grid_{axis}") for axis in "xyz"))


def _is_triton_call(op: ir.Operation) -> bool:
  return (op.name == "stablehlo.custom_call"
          and ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_CALL_TARGET)


def triton_kernels(lowered) -> list[TritonKernel]:
  """Every Triton kernel in a `jax.stages.Lowered`, in program order."""
  module = lowered.compiler_ir("stablehlo")
  return [_kernel(op) for op in _walk(module.operation) if _is_triton_call(op)]
