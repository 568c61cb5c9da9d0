"""One shape catalogue per op, shared by tests, the offline audit, the benchmarks and autotune.

Each op folder has `specs.py` defining `CASES: list[Case]` with shapes from real
models. A case builds its inputs from a PRNG key; `abstract_inputs()` gives the
same as `ShapeDtypeStruct`s so the audit can lower without allocating anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Case:
  op: str                                   # public op name, e.g. "attention"
  label: str                                # e.g. "llama3-8b prefill 4k causal bf16"
  make_inputs: Callable[[jax.Array], tuple]  # key -> positional arguments
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # static keywords
  flops: float = 0.0                        # useful FLOPs (masked work not counted)
  bytes_moved: float = 0.0                  # minimum HBM traffic in bytes
  audit: bool = False                       # part of the offline audit's representative set

  def abstract_inputs(self) -> tuple:
    return jax.eval_shape(self.make_inputs, jax.random.key(0))

  def inputs(self, seed: int = 0) -> tuple:
    return self.make_inputs(jax.random.key(seed))
