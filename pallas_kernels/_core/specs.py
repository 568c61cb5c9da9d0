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
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
  op: str                                   # public op name, e.g. "attention"
  label: str                                # e.g. "llama3-8b prefill 4k causal bf16"
  make_inputs: Callable[[jax.Array], tuple]  # key -> positional arguments
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # static keywords
  flops: float = 0.0                        # useful FLOPs (masked work not counted)
  bytes_moved: float = 0.0                  # minimum HBM traffic in bytes
  audit: bool = False                       # part of the offline audit's representative set
  # Trailing arrays of `make_inputs` passed as these keywords (e.g. "bias", "residual",
  # "cotangent" of a grad case); the rest are positional.
  array_kwargs: tuple[str, ...] = ()

  def abstract_inputs(self) -> tuple:
    return jax.eval_shape(self.make_inputs, jax.random.key(0))

  def inputs(self, seed: int = 0) -> tuple:
    return self.make_inputs(jax.random.key(seed))

  def split(self, inputs: tuple) -> tuple[tuple, dict]:
    """(positional arrays, keyword arrays) of one input set."""
    split = len(inputs) - len(self.array_kwargs)
    return tuple(inputs[:split]), dict(zip(self.array_kwargs, inputs[split:]))

  def bind(self, inputs: tuple) -> tuple[tuple, dict]:
    """The public call's (args, kwargs) for one input set: arrays plus the static kwargs."""
    args, arrays = self.split(tuple(inputs))
    return args, {**self.kwargs, **arrays}


def _is_float_array(value) -> bool:
  return isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(value.dtype, jnp.floating)


def grad_of(fn: Callable) -> Callable:
  """`fn(*args, **kwargs)` -> the gradients of sum(fn(...) * cotangents) (a vjp of `fn`).

  Keyword arrays named `cotangent...` are the cotangents of `fn`'s output leaves, in name
  order ("cotangent", or "cotangent_0", "cotangent_1", ...); they are not passed to `fn`.
  Gradients are taken w.r.t. every floating array argument, positional or keyword, and
  returned as `(positional grads, {keyword: grad})`; other arguments pass through. The loss
  value itself is dead code under jit: what runs is the forward and the vjp with the given
  cotangents, as in a training step. GRAD_CASES of the audit and the bench run through it.
  """
  def grads(*args, **kwargs):
    names = sorted(k for k in kwargs if k.startswith("cotangent"))
    cotangents = [kwargs.pop(k) for k in names]
    arrays = {k: v for k, v in kwargs.items() if _is_float_array(v)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    diff = [i for i, a in enumerate(args) if _is_float_array(a)]

    def loss(diff_args, arrays):
      full = list(args)
      for i, a in zip(diff, diff_args):
        full[i] = a
      leaves = jax.tree.leaves(fn(*full, **arrays, **static))
      if len(leaves) != len(cotangents):
        raise ValueError(f"grad_of: {len(leaves)} output arrays, {len(cotangents)} cotangents "
                         f"({names})")
      return sum(jnp.sum(o.astype(jnp.float32) * c.astype(jnp.float32))
                 for o, c in zip(leaves, cotangents))

    return jax.grad(loss, argnums=(0, 1))([args[i] for i in diff], arrays)
  return grads
