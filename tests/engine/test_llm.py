"""The engine end to end over the tiny model: outputs, stops, streaming, batching, bad input.

Every test runs on the session's engines, v2 (paged, the default) and v1 (max_batch_size 4,
max_seq_len 128), with prompts of at most 16 tokens, so the whole module shares a handful of
compiled programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine import LLM, SamplingParams
from tests.engine.conftest import MAX_SEQ

PROMPTS = ["hello", "wörld of things", "x", "the quick brown"]


@pytest.fixture(params=["v2", "v1"])
def llm(request, llm_v2, llm_v1):
  """Both engines keep the same semantics."""
  return llm_v2 if request.param == "v2" else llm_v1


@pytest.fixture(scope="module")
def reference(tiny):
  """Greedy decoding by the uncached forward, `model(tokens)`, argmax at the last position,
  with vLLM's penalties applied in numpy. Also returns the raw log-softmax of every step."""
  model, tokenizer = tiny
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))

  def run(prompt, n, rep=1.0, presence=0.0, frequency=0.0):
    ids = tokenizer.encode(prompt)
    out, logps = [], []
    for _ in range(n):
      seq = ids + out
      padded = np.zeros((1, 64), np.int32)  # one compiled shape; causal, so padding is inert
      padded[0, :len(seq)] = seq
      logits = np.array(forward(state, jnp.asarray(padded))[0, len(seq) - 1], np.float64)
      logps.append(logits - np.logaddexp.reduce(logits))
      counts = np.bincount(out, minlength=logits.size)
      for t in set(ids) | set(out):
        logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
      logits = logits - frequency * counts - presence * (counts > 0)
      out.append(int(np.argmax(logits)))
    return out, logps

  return run


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_greedy_equals_uncached_argmax_loop(llm, reference):
  outs = llm.generate(PROMPTS[:3], GREEDY)
  for prompt, out in zip(PROMPTS, outs):
    want, _ = reference(prompt, 12)
    assert out.token_ids == want, prompt
    assert out.finish_reason == "length" and out.error is None
    assert out.text == llm.tokenizer.decode(want)
    assert out.prompt == prompt and out.prompt_token_ids == llm.tokenizer.encode(prompt)


def test_penalties_match_reference(llm, reference):
  params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.8,
                          presence_penalty=0.7, frequency_penalty=0.4)
  out = llm.generate(PROMPTS[3], params)[0]
  assert out.token_ids == reference(PROMPTS[3], 10, 1.8, 0.7, 0.4)[0]
  assert out.token_ids != reference(PROMPTS[3], 10)[0]  # the penalties changed something


def test_greedy_does_not_depend_on_batch_mates(llm):
  alone = llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
  mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]],
                       [SamplingParams(max_tokens=5, seed=3), GREEDY,
                        SamplingParams(max_tokens=12, top_p=0.5)])
  assert mixed[1].token_ids == alone


def test_seeded_sampling_independent_of_batch_mates(llm):
  params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
  alone = llm.generate(PROMPTS[0], params)[0].token_ids
  again = llm.generate([PROMPTS[0]], params)[0].token_ids
  others = [SamplingParams(max_tokens=3, temperature=0.7, seed=7), SamplingParams(max_tokens=12)]
  in_batch = llm.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], others + [params])[2].token_ids
  first_row = llm.generate([PROMPTS[0], PROMPTS[3]], [params, others[1]])[0].token_ids
  assert alone == again == in_batch == first_row
  other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1235,
                              ignore_eos=True)
  assert llm.generate(PROMPTS[0], other_seed)[0].token_ids != alone


def test_unseeded_requests_draw_fresh_keys(llm):
  params = SamplingParams(max_tokens=12, temperature=1.5, ignore_eos=True)
  a, b = llm.generate([PROMPTS[0], PROMPTS[0]], params)
  c = llm.generate(PROMPTS[0], params)[0]
  assert len({tuple(a.token_ids), tuple(b.token_ids), tuple(c.token_ids)}) == 3


def _varied_run(llm, n=16):
  """A seeded run whose tokens vary (to pick stops from)."""
  params = SamplingParams(max_tokens=n, temperature=1.0, seed=99, ignore_eos=True)
  return params, llm.generate(PROMPTS[3], params)[0]


def test_stop_token_ids(llm):
  params, full = _varied_run(llm)
  k = next(i for i in range(3, 16) if full.token_ids[i] not in full.token_ids[:i])
  stop = full.token_ids[k]
  params.stop_token_ids = [stop]
  out = llm.generate(PROMPTS[3], params)[0]
  assert out.token_ids == full.token_ids[:k + 1]  # the stop token is kept in token_ids ...
  assert out.text == llm.tokenizer.decode(full.token_ids[:k])  # ... and left out of the text
  assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_stops_unless_ignored(llm, monkeypatch):
  params, full = _varied_run(llm)
  k = next(i for i in range(3, 16) if full.token_ids[i] not in full.token_ids[:i])
  monkeypatch.setattr(llm.tokenizer, "eos_token_id", full.token_ids[k])
  params.ignore_eos = False
  out = llm.generate(PROMPTS[3], params)[0]
  assert out.token_ids == full.token_ids[:k + 1]
  assert (out.finish_reason, out.stop_reason) == ("stop", None)
  params.ignore_eos = True
  assert llm.generate(PROMPTS[3], params)[0].token_ids == full.token_ids


def test_stop_strings_truncate_exactly(llm):
  params, full = _varied_run(llm, 24)
  text = full.text
  start = next(i for i in range(4, len(text) - 2)
               if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
  stop = text[start:start + 2]
  params.stop = ["never-there", stop]
  out = llm.generate(PROMPTS[3], params)[0]
  assert out.text == text[:start]
  assert (out.finish_reason, out.stop_reason) == ("stop", stop)
  n = len(out.token_ids)
  assert out.token_ids == full.token_ids[:n]  # cut at the token that completed the stop string
  assert stop in llm.tokenizer.decode(out.token_ids)
  assert stop not in llm.tokenizer.decode(out.token_ids[:-1])


def test_stream_equals_generate(llm):
  for params in [SamplingParams(max_tokens=30, temperature=0.9, seed=5, ignore_eos=True),
                 SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]:
    want = llm.generate(PROMPTS[1], params)[0]
    stream = llm.stream(PROMPTS[1], params)
    deltas = list(stream)
    assert "".join(deltas) == want.text
    assert len(deltas) > 1  # arrives chunk by chunk (decode_steps=4)
    assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in want.text
    assert stream.output.token_ids == want.token_ids
  # With a stop string: the stream stops exactly where generate's text ends.
  params, full = _varied_run(llm, 24)
  params.stop = full.text[10:12]
  want = llm.generate(PROMPTS[3], params)[0]
  assert "".join(llm.stream(PROMPTS[3], params)) == want.text


def test_multibyte_characters_are_never_split_in_the_stream(llm):
  params = SamplingParams(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
  want = llm.generate("é", params)[0]
  deltas = list(llm.stream("é", params))
  assert "".join(deltas) == want.text
  for d in deltas:
    d.encode("utf-8")  # whole characters only (no lone surrogates)


def test_more_prompts_than_max_batch_size(llm):
  prompts = [f"prompt {i} " + "ab" * (i % 4) for i in range(10)]
  params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
  outs = llm.generate(prompts, params)
  assert [o.index for o in outs] == list(range(10))
  assert [o.prompt for o in outs] == prompts
  for p in (prompts[0], prompts[7]):
    assert outs[prompts.index(p)].token_ids == llm.generate(p, params)[0].token_ids
  done = []
  llm.generate(prompts, params, progress=done.append)
  assert len(done) == 10


def test_logprobs(llm, reference):
  params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
  out = llm.generate(PROMPTS[0], params)[0]
  want, logps = reference(PROMPTS[0], 6)
  assert out.token_ids == want and len(out.logprobs) == 6
  for tok, step, logp in zip(out.token_ids, out.logprobs, logps):
    top3 = np.argsort(-logp)[:3]
    assert set(step) == set(top3.tolist()) | {tok}
    for t, v in step.items():
      np.testing.assert_allclose(v, logp[t], atol=1e-4)
  np.testing.assert_allclose(out.cumulative_logprob, sum(l[t] for t, l in zip(want, logps)),
                             atol=1e-3)
  plain = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0))[0]
  assert plain.logprobs is None and plain.cumulative_logprob is None
  zero = llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0, logprobs=0))[0]
  assert [list(s) for s in zero.logprobs] == [[t] for t in zero.token_ids]


def test_chat_applies_the_template(llm):
  messages = [{"role": "user", "content": "hi"}]
  out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))[0]
  assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(messages)
  assert len(llm.chat([messages, messages], SamplingParams(max_tokens=2))) == 2


def test_metrics(llm):
  out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))[0]
  m = out.metrics
  assert m.num_prompt_tokens == len(out.prompt_token_ids) and m.num_generated_tokens == 9
  assert m.time_to_first_token_s > 0 and m.decode_tokens_per_s > 0 and m.batch_size == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("prompt, field, words", [
    ("", "prompt", "non-empty"),
    ([], "prompt", "at least one token"),
    ([1, 2, 10_000], "prompt", "token ids expected in"),
    ("a" * MAX_SEQ, "prompt", f"has {MAX_SEQ} tokens; max_seq_len is {MAX_SEQ}"),
    ([[1, 2]], "prompt", "a str or a list of token ids"),
])
def test_bad_prompt_raises_alone_and_errors_in_a_batch(llm, prompt, field, words):
  if prompt not in ([[1, 2]], []):  # alone, these two are lists of prompts (none, or one)
    with pytest.raises(ValueError, match=f"`{field}`.*{words}|{words}.*`{field}`|`{field}` {words}"):
      llm.generate(prompt, GREEDY)
  outs = llm.generate([PROMPTS[0], prompt, PROMPTS[1]], GREEDY)
  assert outs[1].finish_reason == "error" and f"`{field}`" in outs[1].error
  assert outs[1].token_ids == [] and outs[1].text == ""
  assert outs[0].finish_reason == outs[2].finish_reason == "length"
  assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == outs[0].token_ids  # still working


def test_no_prompts(llm):
  assert llm.generate([]) == []


def test_params_changed_after_construction_are_checked_per_request(llm):
  bad = SamplingParams(max_tokens=4)
  bad.temperature = -1.0
  with pytest.raises(ValueError, match="`temperature`"):
    llm.generate(PROMPTS[0], bad)
  outs = llm.generate([PROMPTS[0], PROMPTS[1]], [bad, GREEDY])
  assert outs[0].finish_reason == "error" and outs[1].finish_reason == "length"
  stop_ids = SamplingParams(max_tokens=4, stop_token_ids=[10_000])
  with pytest.raises(ValueError, match="`stop_token_ids`"):
    llm.generate(PROMPTS[0], stop_ids)
  with pytest.raises(ValueError, match="`params`"):
    llm.generate([PROMPTS[0], PROMPTS[1]], [GREEDY])
  with pytest.raises(ValueError, match="`prompt`"):
    llm.stream("", GREEDY)


def test_prompt_plus_max_tokens_beyond_max_seq_len_is_clamped(llm):
  prompt = list(range(97, 123)) * 4 + [32] * 6  # 110 tokens: 18 left of max_seq_len 128
  out = llm.generate(prompt, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
  assert out.finish_reason == "length" and len(out.token_ids) == MAX_SEQ - len(prompt)


def test_bad_engine_arguments(tiny):
  model, tokenizer = tiny
  with pytest.raises(ValueError, match="`max_batch_size`"):
    LLM.from_model(model, tokenizer, max_batch_size=0)
  with pytest.raises(ValueError, match="`max_seq_len`.*max_position_embeddings"):
    LLM.from_model(model, tokenizer, max_seq_len=10**6)
  with pytest.raises(ValueError, match="`model`"):
    LLM("no-such-model")
  with pytest.raises(ValueError, match="`model`"):
    LLM(model)


@pytest.mark.parametrize("page_size", [16, None])
def test_kv_cache_dtype(tiny, page_size):
  model, tokenizer = tiny
  llm16 = LLM.from_model(model, tokenizer, kv_cache_dtype=jnp.bfloat16, max_batch_size=1,
                         max_seq_len=MAX_SEQ, decode_steps=4, page_size=page_size)
  out = llm16.generate(PROMPTS[0], GREEDY)[0]
  cache = llm16._pool[0] if page_size else llm16._cache[1]
  assert cache.k[0].dtype == jnp.bfloat16
  assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_stream_can_stop_early(llm):
  params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
  with llm.stream(PROMPTS[0], params) as stream:
    first = next(stream)
  assert first and stream.output.finish_reason is None
  assert llm.generate(PROMPTS[0], params)[0].text.startswith(first)  # the engine carries on
