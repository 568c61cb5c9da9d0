"""`LLM`: generate, stream and chat over a `models.load` model, batch by batch.

A batch of up to `max_batch_size` requests runs as: one prefill program (prompt -> cache and the
first sampled token), then decode chunks of `decode_steps` steps each. The host keeps one chunk in
flight ahead of the one it reads, so detokenization and stop-string checks overlap the device. Each
program is compiled once per bucket (engine.buckets) and kept; `warmup()` compiles them up front.

Bad input. `SamplingParams(...)` raises ValueError on a bad field when it is made. A request's own
problems (empty prompt, too long, token ids out of the vocabulary) raise ValueError when it is the
only prompt (`generate("...")`, `stream`, `chat` with one conversation); in a list of prompts they
become that request's RequestOutput with finish_reason "error" and `error` set, and the others
complete. prompt + max_tokens beyond max_seq_len is not an error: max_tokens is clamped to the
room left, and the request ends with finish_reason "length".
"""

from __future__ import annotations

import collections
import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from engine import batch as batching
from engine import buckets as buckets_lib
from engine import sampling
from engine import steps
from engine.detok import Detokenizer
from engine.outputs import RequestOutput
from engine.params import MAX_LOGPROBS, SamplingParams

DEFAULT_MODEL = "smollm2-135m"


class LLM:
  """An engine over one model. `model` is anything `models.load` accepts (a name or a path).

  The KV cache takes the model's dtype unless `kv_cache_dtype` says otherwise. `max_seq_len`
  bounds prompt + generated tokens of one request. `decode_steps` is the number of decode steps
  per dispatch (and the streaming granularity). `seed` seeds the keys of requests without one.
  """

  def __init__(self, model: str = DEFAULT_MODEL, *, dtype=None, kv_cache_dtype=None,
               max_batch_size: int = 8, max_seq_len: int = 2048, impl: str | None = None,
               decode_steps: int = 16, seed: int = 0):
    _check_limits(max_batch_size, max_seq_len, decode_steps)
    if not isinstance(model, str):
      raise ValueError(f"LLM: `model` expected a model name or path (str), got {model!r}; "
                       "use LLM.from_model for a model object")
    import models  # the model package is only needed for a name or path
    try:
      loaded, tokenizer = models.load(model, dtype=dtype, impl=impl)
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise ValueError(f"LLM: `model` expected a known model name or a model path, got {model!r}"
                       f" ({e})") from e
    self._setup(loaded, tokenizer, kv_cache_dtype, max_batch_size, max_seq_len, decode_steps,
                seed)
    self.model_name = model

  @classmethod
  def from_model(cls, model, tokenizer, *, kv_cache_dtype=None, max_batch_size: int = 8,
                 max_seq_len: int = 2048, decode_steps: int = 16, seed: int = 0) -> LLM:
    """An engine over an already loaded (model, tokenizer) that honours the `models` contract."""
    _check_limits(max_batch_size, max_seq_len, decode_steps)
    self = cls.__new__(cls)
    self._setup(model, tokenizer, kv_cache_dtype, max_batch_size, max_seq_len, decode_steps, seed)
    self.model_name = type(model).__name__
    return self

  def _setup(self, model, tokenizer, kv_cache_dtype, max_batch_size, max_seq_len, decode_steps,
             seed):
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_seq_len > limit:
      raise ValueError(f"LLM: `max_seq_len` expected <= the model's max_position_embeddings "
                       f"({limit}), got {max_seq_len}")
    self.model, self.tokenizer = model, tokenizer
    self.vocab_size = model.config.vocab_size
    self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
    self.buckets = buckets_lib.Buckets.for_limits(max_batch_size, max_seq_len)
    self.programs = steps.Programs(model, kv_cache_dtype=kv_cache_dtype, decode_steps=decode_steps,
                                   top_n=MAX_LOGPROBS)
    self._rng = np.random.default_rng(seed)
    self._cache = None  # ((batch, seq_len), KVCache): reused by the next batch of that shape
    self._lock = threading.RLock()

  # ---------------------------------------------------------------- public API

  def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
               progress: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
    """One RequestOutput per prompt, in order. A prompt is a str or a list of token ids; `params`
    is one SamplingParams for all or one per prompt. `progress` is called as each request ends."""
    single = _is_single_prompt(prompts)
    prompt_list = [prompts] if single else list(prompts)
    reqs = self._requests(prompt_list, params)
    if single and reqs[0].output.error:
      raise ValueError(reqs[0].output.error)
    self._run(reqs, stream=False, progress=progress)
    return [r.output for r in reqs]

  def stream(self, prompt, params: SamplingParams | None = None) -> TextStream:
    """Text deltas of one request as each decode chunk arrives; their concatenation is the
    text `generate` returns. After the loop, `.output` holds the RequestOutput."""
    if not _is_single_prompt(prompt):
      raise ValueError(f"LLM.stream: `prompt` expected one str or list of token ids, got "
                       f"{type(prompt).__name__} of prompts")
    req = self._requests([prompt], params)[0]
    if req.output.error:
      raise ValueError(req.output.error)
    return TextStream(self, req)

  def chat(self, messages, params: SamplingParams | Sequence[SamplingParams] | None = None
           ) -> list[RequestOutput]:
    """`messages`: one conversation (a list of {"role", "content"} dicts) or a list of them."""
    single = bool(messages) and isinstance(messages[0], dict)
    conversations = [messages] if single else list(messages)
    prompts = [self.chat_prompt(c) for c in conversations]
    return self.generate(prompts[0] if single else prompts, params)

  def chat_prompt(self, messages) -> list[int]:
    """The token ids of a conversation under the chat template, ready for generation."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
      raise ValueError(f"LLM.chat: `messages` expected a list of {{'role', 'content'}} dicts, "
                       f"got {messages!r}")
    return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True))

  def warmup(self, batch_sizes: Sequence[int] | None = None,
             prompt_lens: Sequence[int] | None = None,
             cache_lens: Sequence[int] | None = None) -> int:
    """Compile every program of the bucket ladders (or of the given rungs) ahead of time.
    Returns the number of programs compiled now."""
    pick = lambda rungs, want: rungs if want is None else {buckets_lib.bucket(w, rungs)
                                                           for w in want}
    bs, ts = pick(self.buckets.batch, batch_sizes), pick(self.buckets.prompt, prompt_lens)
    ss = pick(self.buckets.cache, cache_lens)
    before = len(self.programs.compiled)
    for kind, shape in self.buckets.programs():
      if shape[0] in bs and shape[-1] in ss and (kind == "decode" or shape[1] in ts):
        self._program(kind, shape)
    return len(self.programs.compiled) - before

  def warmup_for(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> int:
    """Compile exactly the programs `generate(prompts, params)` will run. Returns how many were
    compiled now."""
    prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
    rng_state = self._rng.bit_generator.state  # planning must not consume unseeded keys
    reqs = [r for r in self._requests(prompt_list, params) if not r.finished]
    self._rng.bit_generator.state = rng_state
    before = len(self.programs.compiled)
    for batch in self._plan(reqs):
      b, t, s = self._shapes(batch)
      self._program("prefill", (b, t, s))
      self._program("decode", (b, s))
    return len(self.programs.compiled) - before

  @property
  def num_compiled_programs(self) -> int:
    return len(self.programs.compiled)

  # ---------------------------------------------------------------- requests

  def _requests(self, prompts: list, params) -> list[batching.Request]:
    if params is None:
      params = SamplingParams()
    if isinstance(params, SamplingParams):
      params = [params] * len(prompts)
    elif not isinstance(params, Sequence) or len(params) != len(prompts):
      raise ValueError(f"LLM: `params` expected one SamplingParams or a list of {len(prompts)}, "
                       f"got {params!r}")
    arrival = time.perf_counter()
    reqs = []
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
      req = batching.new_request(i, prompt, sp, arrival=arrival)
      try:
        self._admit(req, prompt, sp)
      except ValueError as e:
        batching.fail(req, str(e))
      reqs.append(req)
    return reqs

  def _admit(self, req: batching.Request, prompt, sp) -> None:
    """Tokenize and check one request; ValueError naming the field when it cannot run."""
    if not isinstance(sp, SamplingParams):
      raise ValueError(f"LLM: `params` expected SamplingParams, got {type(sp).__name__}")
    sp.validate()  # fields may have been changed since construction
    ids = self._prompt_ids(prompt)
    req.output.prompt_token_ids = ids
    n = len(ids)
    if n >= self.max_seq_len:
      raise ValueError(f"LLM: `prompt` has {n} tokens; max_seq_len is {self.max_seq_len}, which "
                       f"must hold the prompt and at least one generated token (at most "
                       f"{self.max_seq_len - 1} prompt tokens)")
    bad = [t for t in sp.stop_token_ids or () if t >= self.vocab_size]
    if bad:
      raise ValueError(f"LLM: `stop_token_ids` expected ids below the vocabulary size "
                       f"{self.vocab_size}, got {bad}")
    req.max_tokens = min(sp.max_tokens, self.max_seq_len - n)
    eos = getattr(self.tokenizer, "eos_token_id", None)
    stop_ids = set(sp.stop_token_ids or ())
    if eos is not None and not sp.ignore_eos:
      stop_ids.add(int(eos))
    req.stop_ids = frozenset(stop_ids)
    req.key_data = (batching.seed_key(sp.seed) if sp.seed is not None
                    else tuple(int(x) for x in self._rng.integers(0, 2**32, 2, dtype=np.uint64)))
    req.detok = Detokenizer(self.tokenizer, sp.stop_strings)
    req.output.metrics.num_prompt_tokens = n
    if sp.logprobs is not None:
      req.output.logprobs, req.output.cumulative_logprob = [], 0.0

  def _prompt_ids(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      if not prompt:
        raise ValueError("LLM: `prompt` expected a non-empty string, got ''")
      ids = list(self.tokenizer.encode(prompt))
    elif isinstance(prompt, (list, tuple, np.ndarray)):
      ids = [int(t) for t in prompt] if all(isinstance(t, numbers.Integral) and not
                                            isinstance(t, bool) for t in prompt) else None
      if ids is None:
        raise ValueError(f"LLM: `prompt` expected a str or a list of token ids, got {prompt!r}")
    else:
      raise ValueError(f"LLM: `prompt` expected a str or a list of token ids, got "
                       f"{type(prompt).__name__}")
    if not ids:
      raise ValueError("LLM: `prompt` expected at least one token, got an empty prompt")
    bad = [t for t in ids if not 0 <= t < self.vocab_size]
    if bad:
      raise ValueError(f"LLM: `prompt` token ids expected in [0, {self.vocab_size}), got "
                       f"{bad[:5]}")
    return ids

  # ---------------------------------------------------------------- running

  def _run(self, reqs, *, stream: bool, progress=None) -> Iterator[None]:
    """Run the valid requests batch by batch (longest prompts together); returns when done."""
    for _ in self._batches(reqs, stream=stream, progress=progress):
      pass

  def _plan(self, reqs) -> list[list[batching.Request]]:
    """Batches of at most max_batch_size, prompts of similar length together."""
    todo = sorted((r for r in reqs if not r.finished), key=lambda r: len(r.prompt_ids))
    return [todo[i:i + self.max_batch_size] for i in range(0, len(todo), self.max_batch_size)]

  def _shapes(self, reqs) -> tuple[int, int, int]:
    return self.buckets.shapes(len(reqs), max(len(r.prompt_ids) for r in reqs),
                               max(len(r.prompt_ids) + r.max_tokens for r in reqs))

  def _batches(self, reqs, *, stream: bool, progress=None) -> Iterator[list]:
    with self._lock:
      for batch in self._plan(reqs):
        yield from self._run_batch(batch, stream, progress)
      if progress:
        for r in reqs:
          if r.output.finish_reason == "error":
            progress(r.output)

  def _program(self, kind: str, shape: tuple[int, ...]):
    def example():
      b = shape[0]
      params = batching.row_params([], b, self.vocab_size)
      if kind == "prefill":
        return batching.prefill_inputs([], b, shape[1]), params
      return params, np.zeros((b,), bool)
    return self.programs.get(kind, shape, example)

  def _take_cache(self, shape):
    if self._cache is not None and self._cache[0] == shape:
      cache, self._cache = self._cache[1], None
      return cache
    self._drop_cache()
    return self.programs.model.init_cache(shape[0], shape[1], self.programs.kv_cache_dtype)

  def _drop_cache(self):
    if self._cache is not None:
      for leaf in jax.tree.leaves(self._cache[1]):
        leaf.delete()
      self._cache = None

  def _run_batch(self, reqs, stream: bool, progress) -> Iterator[list]:
    """Prefill then decode chunks, one chunk in flight ahead of the one being read. Yields, per
    chunk read, the [(request, text delta)] with new text (deltas only when `stream`)."""
    b, t, s = self._shapes(reqs)
    inputs = batching.prefill_inputs(reqs, b, t)
    params = jax.device_put(batching.row_params(reqs, b, self.vocab_size))
    prefill, decode = self._program("prefill", (b, t, s)), self._program("decode", (b, s))
    for r in reqs:
      r.output.metrics.batch_size = b
    state = self.programs.state
    cache = self._take_cache((b, s))
    cache, rows, first = prefill(state, cache, jax.device_put(inputs), params)
    in_flight = collections.deque([first])
    host_stop = np.zeros((b,), bool)
    while in_flight:
      if len(in_flight) < 2 and not all(r.finished for r in reqs):
        cache, rows, out = decode(state, cache, rows, params, jax.device_put(host_stop))
        in_flight.append(out)
      out = jax.device_get(in_flight.popleft())
      now = time.perf_counter()
      deltas = []
      for i, r in enumerate(reqs):
        if not r.finished:
          delta = self._absorb(r, out, i, now, stream)
          host_stop[i] = r.finished
          if delta:
            deltas.append((r, delta))
          if r.finished and progress:
            progress(r.output)
      yield deltas
    self._cache = ((b, s), cache)

  def _absorb(self, req: batching.Request, out: sampling.StepOutput, row: int, now: float,
              stream: bool) -> str:
    """Append one row's new tokens; decide finishes; returns the text delta (when streaming or
    when stop strings must be checked)."""
    o, sp = req.output, req.params
    first_new = len(o.token_ids)
    for j, tok in enumerate(out.tokens[row]):
      tok = int(tok)
      if tok == sampling.PAD:
        break
      o.token_ids.append(tok)
      if o.logprobs is not None:
        self._record_logprobs(o, sp.logprobs, tok, out, row, j)
      if tok in req.stop_ids:
        o.finish_reason, o.stop_reason = "stop", (tok if tok in (sp.stop_token_ids or ()) else None)
      elif len(o.token_ids) >= req.max_tokens:
        o.finish_reason = "length"
      if o.finish_reason:
        break
    if first_new == 0 and o.token_ids:
      o.metrics.first_token_time = now
    text_ids = o.token_ids[:-1] if o.finish_reason == "stop" else o.token_ids
    hit = req.detok.find_stop(text_ids, first_new)
    if hit is not None:
      n, o.text, o.stop_reason = hit
      o.finish_reason = "stop"
      del o.token_ids[n:]
      if o.logprobs is not None:
        del o.logprobs[n:]
    elif o.finish_reason or stream:
      o.text = req.detok.decode(text_ids)
    if o.finish_reason:
      o.metrics.finish_time = now
      o.metrics.num_generated_tokens = len(o.token_ids)
      if o.logprobs is not None:
        o.cumulative_logprob = float(sum(step[tid] for step, tid in zip(o.logprobs, o.token_ids)))
    return req.detok.release(o.text, final=bool(o.finish_reason)) if stream else ""

  @staticmethod
  def _record_logprobs(o: RequestOutput, n: int, tok: int, out, row: int, j: int) -> None:
    step = {int(i): float(v) for i, v in zip(out.top_ids[row, j, :n], out.top_logprobs[row, j, :n])}
    step[tok] = float(out.logprob[row, j])
    o.logprobs.append(step)


class TextStream:
  """Iterator of one request's text deltas; `.output` is its RequestOutput once exhausted."""

  def __init__(self, llm: LLM, req: batching.Request):
    self._deltas = (delta for chunk in llm._batches([req], stream=True)
                    for _, delta in chunk)
    self.output = req.output

  def __iter__(self):
    return self

  def __next__(self) -> str:
    return next(self._deltas)

  def close(self) -> None:
    """Stop early: the request keeps the text so far (finish_reason stays None)."""
    self._deltas.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _is_single_prompt(prompts) -> bool:
  if isinstance(prompts, str):
    return True
  return (isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts) > 0
          and all(isinstance(t, numbers.Integral) for t in prompts))


def _check_limits(max_batch_size, max_seq_len, decode_steps):
  for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                      ("decode_steps", decode_steps)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"LLM: `{name}` expected a positive int, got {value!r}")
