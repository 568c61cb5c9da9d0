"""The compiled paged programs never copy a layer's page pool: it is donated and every page write
is in place. A whole-pool copy per layer per step is the regression this guards against (60 per
SmolLM2 decode step once; bench/notes/engine.md). Read off the compiled HLO with
`engine.measure_paged_decode.pool_copies`."""

import jax
import jax.numpy as jnp
import pytest

from engine import paged_steps
from engine import steps as steps_lib
from engine.measure_paged_decode import pool_copies
from tests.models.conftest import TINY, random_llama

# Batch 1 is the case that copied (a one-row scatter becomes a dynamic-update-slice).
SHAPES = [("paged_decode", (1, 8)), ("paged_decode", (4, 8)), ("paged_prefill", (2, 16, 8))]


def _pool_shape(programs) -> tuple[int, ...]:
  return tuple(jax.eval_shape(programs.init_cache).k[0].shape)


def test_pool_copies_counts_copies_of_the_pool_in_any_shape():
  hlo = """
  %copy.1 = f32[33,16,2,8]{3,2,1,0} copy(%p0)
  %copy.2 = f32[528,2,8]{2,1,0} copy(%bitcast.3)
  %copy-start.4 = f32[528,2,8]{2,1,0} copy-start(%p1)
  %copy.5 = f32[1,2,8]{2,1,0} copy(%p2)
  %fusion.6 = f32[33,16,2,8]{3,2,1,0} fusion(%p0), kind=kLoop
  """
  assert pool_copies(hlo, (33, 16, 2, 8)) == 3


@pytest.mark.parametrize("kind,shape", SHAPES)
def test_engine_programs_do_not_copy_the_pool(llm_v2, kind, shape):
  """The engine's tiny model writes through models.paged_cache.write (any row count, drop mode)."""
  programs = llm_v2.paged_programs
  assert pool_copies(programs.get(kind, shape).as_text(), _pool_shape(programs)) == 0


@pytest.fixture(scope="module")
def llama_programs():
  """Engine programs over a tiny models.llama.Llama: Decoder.paged_decode / paged_prefill."""
  model = random_llama(TINY)
  graphdef, state = steps_lib.split(model)
  return paged_steps.PagedPrograms(model, graphdef, state, kv_cache_dtype=jnp.float32,
                                   num_pages=33, page_size=16, num_slots=4, history_len=128,
                                   decode_steps=4, top_n=2)


@pytest.mark.parametrize("kind,shape", SHAPES)
def test_llama_programs_do_not_copy_the_pool(llama_programs, kind, shape):
  hlo = llama_programs.get(kind, shape).as_text()
  assert pool_copies(hlo, _pool_shape(llama_programs)) == 0
