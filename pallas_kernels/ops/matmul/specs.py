"""Projection shapes of real models for matmul / gated_matmul, and the peers to compare with.

Rows span decode (M = 1, 8, 32 tokens: a GEMV over the weights, bound by weight bytes)
and prefill (M = 512, 2048, 8192 tokens: bound by tensor-core FLOPs). Each model
contributes its attention QKV projection, the output projection and the MLP down
projection (both + residual, the fused epilogue), the gate/up pair (gated_matmul), and at
decode the LM head. Llama-3-70B rows are one tensor-parallel shard (TP = 8). A case's
`make_inputs` returns the positional arguments followed by the arrays named in
`array_kwargs` (bias, residual); `bind` splits them for the public call. GRAD_CASES are the
same layers at training token counts, for the backward kernels (see below).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels._core.specs import Case
from pallas_kernels.ops.matmul import reference

DECODE_M = (1, 8, 32)
PREFILL_M = (512, 2048, 8192)


@dataclasses.dataclass(frozen=True)
class Layer:
  model: str
  name: str
  k: int
  n: int
  gated: bool = False
  bias: bool = False
  residual: bool = False
  activation: str | None = None  # for gated layers: the gate's activation
  decode_only: bool = False       # LM heads: prefill computes logits for the last token only


def _model(model: str, hidden: int, qkv: int, attn_out_k: int, inter: int, vocab: int,
           shard: str = "") -> list[Layer]:
  tag = f"{model}{shard}"
  return [
      Layer(tag, "qkv", hidden, qkv),
      Layer(tag, "o_proj +residual", attn_out_k, hidden, residual=True),
      Layer(tag, "gate/up swiglu", hidden, inter, gated=True, activation="silu"),
      Layer(tag, "down_proj +residual", inter, hidden, residual=True),
      Layer(tag, "lm_head", hidden, vocab, decode_only=True),
  ]


LAYERS = (
    # SmolLM2-135M: hidden 576, 9 q heads + 2 x 3 kv heads of 64, intermediate 1536, vocab 49152.
    *_model("smollm2-135m", 576, 960, 576, 1536, 49152),
    # Llama-3-8B: hidden 4096, 32 q + 2 x 8 kv heads of 128, intermediate 14336, vocab 128256.
    *_model("llama3-8b", 4096, 6144, 4096, 14336, 128256),
    # Llama-3-70B, one TP-8 shard: hidden 8192, (64 + 2 x 8) heads of 128 / 8, 28672 / 8, vocab / 8.
    *_model("llama3-70b", 8192, 1280, 1024, 3584, 16032, shard=" tp8"),
    # Epilogue coverage from real models: Gemma-2B's GeGLU (tanh GELU), Phi-2's MLP fc1
    # (bias + tanh GELU), Pythia-1B's MLP up (bias + exact erf GELU).
    Layer("gemma-2b", "gate/up geglu", 2048, 16384, gated=True, activation="gelu_tanh"),
    Layer("phi-2", "fc1 +bias gelu_tanh", 2560, 10240, bias=True, activation="gelu_tanh"),
    Layer("pythia-1b", "mlp up +bias gelu", 2048, 8192, bias=True, activation="gelu"),
)

# The offline audit's representative set: (model, layer name, M, dtype).
AUDIT = {
    ("llama3-8b", "qkv", 1, "bfloat16"),                        # decode GEMV
    ("llama3-8b", "lm_head", 8, "bfloat16"),                    # widest N, decode
    ("llama3-8b", "gate/up swiglu", 32, "bfloat16"),            # gated decode
    ("llama3-8b", "gate/up swiglu", 2048, "bfloat16"),          # gated prefill
    ("llama3-8b", "down_proj +residual", 8192, "bfloat16"),     # prefill + residual
    ("smollm2-135m", "o_proj +residual", 8, "float16"),         # small model, fp16 decode
    ("gemma-2b", "gate/up geglu", 512, "float16"),              # GeGLU fp16 prefill
    ("pythia-1b", "mlp up +bias gelu", 2048, "float16"),        # bias + erf-GELU epilogue
    ("llama3-70b tp8", "o_proj +residual", 1, "bfloat16"),      # short K, decode
}
# Extra dtypes: each layer runs in bf16; the audit rows above in their own dtype too.
DTYPE = jnp.bfloat16



def _make_inputs(key, *, layer: Layer, m: int, dtype):
  kx, kw, ku, kb, kr = jax.random.split(key, 5)
  scale = layer.k ** -0.5  # unit-variance outputs, as in a trained projection
  x = jax.random.normal(kx, (m, layer.k), jnp.float32).astype(dtype)
  w = (scale * jax.random.normal(kw, (layer.k, layer.n), jnp.float32)).astype(dtype)
  args = (x, w)
  if layer.gated:
    args += (scale * jax.random.normal(ku, (layer.k, layer.n), jnp.float32)).astype(dtype),
  if layer.bias:
    args += (0.1 * jax.random.normal(kb, (layer.n,), jnp.float32)).astype(dtype),
  if layer.residual:
    args += jax.random.normal(kr, (m, layer.n), jnp.float32).astype(dtype),
  return args


def _case(layer: Layer, m: int, dtype) -> Case:
  itemsize = jnp.dtype(dtype).itemsize
  weights = 2 if layer.gated else 1
  vectors = layer.n * layer.bias
  streams = m * layer.k + m * layer.n * (1 + layer.residual)  # x, out (+ residual)
  name = jnp.dtype(dtype).name
  if layer.gated:
    kwargs = {"activation": layer.activation}
  else:
    kwargs = {"activation": layer.activation} if layer.activation else {}
  return Case(
      op="gated_matmul" if layer.gated else "matmul",
      label=f"{layer.model} {layer.name} M={m} K={layer.k} N={layer.n} {name}",
      make_inputs=functools.partial(_make_inputs, layer=layer, m=m, dtype=dtype),
      kwargs=kwargs,
      flops=float(2 * weights * m * layer.n * layer.k),
      bytes_moved=float((weights * layer.k * layer.n + vectors + streams) * itemsize),
      audit=(layer.model, layer.name, m, name) in AUDIT,
      array_kwargs=("bias",) * layer.bias + ("residual",) * layer.residual,
  )


def _rows(layer: Layer) -> tuple[int, ...]:
  return DECODE_M if layer.decode_only else DECODE_M + PREFILL_M


CASES: list[Case] = [
    *(_case(layer, m, DTYPE) for layer in LAYERS for m in _rows(layer)),
    # The audit rows in a dtype other than bf16 (fp16) are added once each.
    *(_case(layer, m, jnp.dtype(d)) for layer in LAYERS for m in _rows(layer)
      for model, name, audit_m, d in sorted(AUDIT)
      if (model, name, audit_m) == (layer.model, layer.name, m) and d != jnp.dtype(DTYPE).name),
]


# ---- backward: training shapes ---------------------------------------------------------------
# A grad case's inputs end with a random cotangent of the output ("cotangent"); the audit and
# the benchmark run it as `_core.specs.grad_of(op)`: the forward plus the vjp, as in a
# training step. Rows are tokens per micro-batch.

GRAD_M = (2048, 8192)
# The audit's representative backward set: (model, layer name, M, dtype).
GRAD_AUDIT = {
    ("llama3-8b", "down_proj +residual", 2048, "bfloat16"),  # no activation: dz = g
    ("llama3-8b", "gate/up swiglu", 2048, "bfloat16"),       # gated: 2-pair dx, 2-output dw
    ("pythia-1b", "mlp up +bias gelu", 2048, "float16"),     # saved pre-activation, dbias
    ("smollm2-135m", "qkv", 2048, "bfloat16"),               # narrow K = 576
}


def grad_floor(layer: Layer, m: int, dtype) -> tuple[float, float]:
  """(flops, bytes) of the backward alone: dx = dz @ w.T and dw = x.T @ dz per weight
  (4 M N K each); bytes = read g, x, the weights and the saved pre-activations (one per
  weight, only with an activation), write dx, dw (and dbias). dresidual is g itself. Our
  implementation also writes dz (with an activation) and reads it twice: not in the floor."""
  itemsize = jnp.dtype(dtype).itemsize
  weights = 2 if layer.gated else 1
  saved = weights if (layer.gated or layer.activation) else 0
  elements = (m * layer.n * (1 + saved) + 2 * m * layer.k + 2 * weights * layer.k * layer.n
              + layer.n * layer.bias)
  return float(4 * weights * m * layer.n * layer.k), float(elements * itemsize)


def _make_grad_inputs(key, *, layer: Layer, m: int, dtype):
  cotangent = jax.random.normal(jax.random.fold_in(key, 1), (m, layer.n), jnp.float32)
  return _make_inputs(key, layer=layer, m=m, dtype=dtype) + (cotangent.astype(dtype),)


def _grad_case(layer: Layer, m: int, dtype) -> Case:
  """Forward (saving the pre-activations when there is an activation) plus backward."""
  fwd = _case(layer, m, dtype)
  weights = 2 if layer.gated else 1
  saved = weights if (layer.gated or layer.activation) else 0
  bwd_flops, bwd_bytes = grad_floor(layer, m, dtype)
  return dataclasses.replace(
      fwd, label=f"grad {fwd.label}",
      make_inputs=functools.partial(_make_grad_inputs, layer=layer, m=m, dtype=dtype),
      flops=fwd.flops + bwd_flops,
      bytes_moved=fwd.bytes_moved + saved * m * layer.n * jnp.dtype(dtype).itemsize + bwd_bytes,
      audit=(layer.model, layer.name, m, jnp.dtype(dtype).name) in GRAD_AUDIT,
      array_kwargs=fwd.array_kwargs + ("cotangent",))


GRAD_CASES: list[Case] = [
    *(_grad_case(layer, m, DTYPE) for layer in LAYERS if not layer.decode_only for m in GRAD_M),
    *(_grad_case(layer, m, jnp.dtype(d)) for layer in LAYERS if not layer.decode_only
      for m in GRAD_M for model, name, audit_m, d in sorted(GRAD_AUDIT)
      if (model, name, audit_m) == (layer.model, layer.name, m) and d != jnp.dtype(DTYPE).name),
]


# ---- peers for the GPU benchmark: the public ops' arguments ---------------------------------

def _xla_peer() -> Callable:
  """jnp.dot (cuBLAS) + the epilogue, jitted: XLA may fuse bias/activation/residual into the
  GEMM's epilogue or one elementwise fusion after it. Three positional arrays = gated."""
  def fn(x, w, w_up=None, *, bias=None, residual=None, activation=None, out_dtype=None):
    if w_up is not None:
      return reference.gated_matmul(x, w, w_up, activation=activation)
    return reference.matmul(x, w, bias=bias, activation=activation, residual=residual,
                            out_dtype=out_dtype)
  return jax.jit(fn, static_argnames=("activation", "out_dtype"))


_TOKAMAX_ACTIVATIONS = {
    None: None, "silu": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _tokamax_peer() -> Callable:
  """tokamax.gated_linear_unit (its Triton kernel) for the gated cases; it takes the weights
  stacked `[K, 2, N]`, and the stack (one extra pass over the weights) is inside the timed
  call, so it overstates tokamax's time. tokamax has no dense matmul-with-epilogue op."""
  import tokamax  # noqa: PLC0415 (optional)

  def fn(x, w, w_up=None, *, activation=None, **unused):
    if w_up is None:
      raise NotImplementedError("tokamax has no dense matmul with a fused epilogue")
    weights = jnp.stack([w, w_up], axis=1)
    return tokamax.gated_linear_unit(x, weights, activation=_TOKAMAX_ACTIVATIONS[activation],
                                     implementation="triton")
  return jax.jit(fn, static_argnames=("activation",))


def peers() -> dict[str, Callable]:
  """Other implementations taking the public op's arguments, for the GPU benchmark.

  Imports are lazy; a peer that cannot run a case raises NotImplementedError.
  """
  out = {"xla": _xla_peer()}
  try:
    out["tokamax"] = _tokamax_peer()
  except ImportError:
    pass
  return out
