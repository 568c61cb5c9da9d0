import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import Llama, LlamaConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"

# Tiny shapes: multiples of 16 so every Pallas kernel's blocks fit in interpret mode too.
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)


def random_llama(config: LlamaConfig = TINY, *, seed: int = 0, dtype=jnp.float32,
                 **kwargs) -> Llama:
  """A Llama with every parameter random, norm weights and biases included, so a weight read
  from the wrong place changes the output. Filled from numpy: eager jax.random would compile a
  kernel per parameter shape."""
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), **kwargs))
  rng = np.random.default_rng(seed)
  for path, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param):
      shape = param.get_value().shape
      if len(shape) == 1:
        values = rng.normal(1.0 if "norm" in str(path[-1]) else 0.0, 0.2, shape)
      else:
        values = rng.normal(0.0, 0.1 if path[0] == "embed" else shape[0] ** -0.5, shape)
      param.set_value(jnp.asarray(values, dtype))
  return model


@pytest.fixture(scope="session")
def smollm2_fixture():
  return json.loads((FIXTURES / "smollm2_135m.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_gguf():
  from models import gguf, registry
  return gguf.GGUFFile(registry.resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
  from models.tokenizer import Tokenizer
  return Tokenizer.from_gguf(smollm2_gguf)
