"""`LLM`: generate, stream and chat over a `models.load` model.

Engine v2 (the default, `page_size=16`): a page pool shared by all requests (engine.paging),
continuous batching (engine.scheduler): requests join and leave between steps, prompts are
prefilled in chunks beside the running decodes, and the newest request is preempted (and later
recomputed) when pages run out. Each step dispatches the prefill chunks (a program per group of
similar lengths) and one decode chunk of `decode_steps` steps (engine.paged_steps), then reads
the previous step's decode chunk, so one chunk is always in flight while the host detokenizes,
and last the first tokens of the prompts this step's prefill completed (the decode chunk queued
behind them keeps the device busy meanwhile): a request's first token comes back from the step
that ran its final prefill chunk, not one decode chunk later.
`add_request` / `step` / `abort` drive it directly; `generate` and `stream` run it until their
requests end.

Engine v1 (`page_size=None`): static batches of up to `max_batch_size` requests, each one prefill
program (prompt -> contiguous cache and the first sampled token), then decode chunks of
`decode_steps` steps, one chunk in flight ahead of the one read. Kept for comparison.

Each program is compiled once per bucket (engine.buckets) and kept; `warmup()` compiles them up
front.

Bad input. `SamplingParams(...)` raises ValueError on a bad field when it is made. A request's own
problems (empty prompt, too long, token ids out of the vocabulary) raise ValueError when it is the
only prompt (`generate("...")`, `stream`, `chat` with one conversation); in a list of prompts they
become that request's RequestOutput with finish_reason "error" and `error` set, and the others
complete. prompt + max_tokens beyond max_seq_len is not an error: max_tokens is clamped to the
room left, and the request ends with finish_reason "length".
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from engine import batch as batching
from engine import buckets as buckets_lib
from engine import paged_steps
from engine import sampling
from engine import steps
from engine.detok import Detokenizer
from engine.outputs import RequestOutput
from engine.paging import BlockManager
from engine.params import MAX_LOGPROBS, SamplingParams
from engine.scheduler import FINISHED, Scheduler
from engine.scheduler import Sequence as SchedSequence

DEFAULT_MODEL = "smollm2-135m"


class LLM:
  """An engine over one model. `model` is anything `models.load` accepts (a name or a path).

  The KV cache takes the model's dtype unless `kv_cache_dtype` says otherwise. `max_seq_len`
  bounds prompt + generated tokens of one request. `decode_steps` is the number of decode steps
  per dispatch (and the streaming granularity). `seed` seeds the keys of requests without one.

  Paging (engine v2): `page_size` tokens per page (None: engine v1, contiguous static batches);
  `num_pages` in the pool, page 0 being scratch (default: room for max_batch_size x max_seq_len
  tokens; a smaller pool queues and preempts, and serves every request whose prompt fits in it);
  `enable_prefix_caching` shares the full pages of common prompt prefixes; at most
  `max_num_batched_tokens` prompt tokens are prefilled per step (longer prompts take several).
  `max_batch_size` is the number of requests running at once.
  """

  def __init__(self, model: str = DEFAULT_MODEL, *, dtype=None, kv_cache_dtype=None,
               max_batch_size: int = 8, max_seq_len: int = 2048, impl: str | None = None,
               decode_steps: int = 16, seed: int = 0, page_size: int | None = 16,
               num_pages: int | None = None, enable_prefix_caching: bool = True,
               max_num_batched_tokens: int = 512):
    paging = dict(page_size=page_size, num_pages=num_pages,
                  enable_prefix_caching=enable_prefix_caching,
                  max_num_batched_tokens=max_num_batched_tokens)
    _check_limits(max_batch_size, max_seq_len, decode_steps, **paging)
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
                seed, paging)
    self.model_name = model

  @classmethod
  def from_model(cls, model, tokenizer, *, kv_cache_dtype=None, max_batch_size: int = 8,
                 max_seq_len: int = 2048, decode_steps: int = 16, seed: int = 0,
                 page_size: int | None = 16, num_pages: int | None = None,
                 enable_prefix_caching: bool = True, max_num_batched_tokens: int = 512) -> LLM:
    """An engine over an already loaded (model, tokenizer) that honours the `models` contract."""
    paging = dict(page_size=page_size, num_pages=num_pages,
                  enable_prefix_caching=enable_prefix_caching,
                  max_num_batched_tokens=max_num_batched_tokens)
    _check_limits(max_batch_size, max_seq_len, decode_steps, **paging)
    self = cls.__new__(cls)
    self._setup(model, tokenizer, kv_cache_dtype, max_batch_size, max_seq_len, decode_steps, seed,
                paging)
    self.model_name = type(model).__name__
    return self

  def _setup(self, model, tokenizer, kv_cache_dtype, max_batch_size, max_seq_len, decode_steps,
             seed, paging):
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
    self.page_size = paging["page_size"]
    self.paged = self.page_size is not None
    if self.paged:
      self._setup_paged(kv_cache_dtype, decode_steps, **paging)

  def _setup_paged(self, kv_cache_dtype, decode_steps, *, page_size, num_pages,
                   enable_prefix_caching, max_num_batched_tokens):
    if num_pages is None:
      num_pages = self.max_batch_size * -(-self.max_seq_len // page_size) + 1  # + scratch
    self.num_pages, self.enable_prefix_caching = num_pages, enable_prefix_caching
    self.max_num_batched_tokens = max_num_batched_tokens
    self.paged_buckets = buckets_lib.PagedBuckets.for_limits(
        self.max_batch_size, self.max_seq_len, page_size, max_num_batched_tokens)
    self.paged_programs = paged_steps.PagedPrograms(
        self.model, self.programs.graphdef, self.programs.state, kv_cache_dtype=kv_cache_dtype,
        num_pages=num_pages, page_size=page_size, num_slots=self.max_batch_size,
        history_len=self.max_seq_len, decode_steps=decode_steps, top_n=MAX_LOGPROBS)
    self._slot_params = batching.row_params([], self.max_batch_size, self.vocab_size)  # host
    self._next_request_id = 0
    self._reset_pool()

  def _reset_pool(self) -> None:
    """A fresh page pool, allocator and scheduler (at start, and after a failed step)."""
    self.block_manager = BlockManager(self.num_pages, self.page_size,
                                      enable_prefix_caching=self.enable_prefix_caching)
    self.scheduler = Scheduler(self.block_manager, max_num_seqs=self.max_batch_size,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               decode_steps=self.paged_programs.decode_steps)
    self._pool = None           # (PagedKVCache, Slots) on the device, made on first use
    self._device_params = None  # per-slot RowParams on the device; None: to upload
    self._in_flight = collections.deque()  # decode chunks dispatched, not read: [_Ran] each
    self._live: dict[int, batching.Request] = {}  # unfinished requests by id
    self._just_ended: list[batching.Request] = []  # ended since the last _step returned
    self._unreturned: list[RequestOutput] = []    # add_request outputs ended, not yet stepped

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
    Returns the number of programs compiled now. (v2: prompt_lens pick prefill-chunk rungs and
    cache_lens block-table rungs.)"""
    pick = lambda rungs, want: rungs if want is None else {buckets_lib.bucket(w, rungs)
                                                           for w in want}
    if self.paged:
      pages = None if cache_lens is None else [-(-c // self.page_size) for c in cache_lens]
      b = self.paged_buckets
      return self._warmup_paged(pick(b.batch, batch_sizes), pick(b.chunk, prompt_lens),
                                pick(b.pages, pages))
    bs, ts = pick(self.buckets.batch, batch_sizes), pick(self.buckets.prompt, prompt_lens)
    ss = pick(self.buckets.cache, cache_lens)
    before = len(self.programs.compiled)
    for kind, shape in self.buckets.programs():
      if shape[0] in bs and shape[-1] in ss and (kind == "decode" or shape[1] in ts):
        self._program(kind, shape)
    return len(self.programs.compiled) - before

  def warmup_for(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> int:
    """Compile the programs `generate(prompts, params)` will run: exactly those on v1; on v2,
    whose schedule depends on timing and the prefix cache, every program of the rungs up to
    its largest batch, prefill chunk and block table. Returns how many were compiled now."""
    prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
    rng_state = self._rng.bit_generator.state  # planning must not consume unseeded keys
    reqs = [r for r in self._requests(prompt_list, params) if not r.finished]
    self._rng.bit_generator.state = rng_state
    if self.paged:
      return self._warmup_paged_for(reqs)
    before = len(self.programs.compiled)
    for batch in self._plan(reqs):
      b, t, s = self._shapes(batch)
      self._program("prefill", (b, t, s))
      self._program("decode", (b, s))
    return len(self.programs.compiled) - before

  @property
  def num_compiled_programs(self) -> int:
    return len(self.programs.compiled) + (len(self.paged_programs.compiled) if self.paged else 0)

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
    if self.paged:
      self._fit_pool(req, n)
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

  def _fit_pool(self, req: batching.Request, n: int) -> None:
    """A prompt must fit in the page pool; max_tokens is clamped to it, as to max_seq_len."""
    capacity = self.scheduler.capacity_tokens
    if n > capacity:
      raise ValueError(f"LLM: `prompt` has {n} tokens; the KV page pool holds {capacity} "
                       f"(num_pages {self.num_pages} - 1 scratch, x page_size {self.page_size})")
    req.max_tokens = min(req.max_tokens, capacity + 1 - n)  # the last token needs no K/V

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

  def _run(self, reqs, *, stream: bool, progress=None) -> None:
    """Run the valid requests (v1: batch by batch, longest prompts together); returns when
    done."""
    if self.paged:
      self._run_paged(reqs, progress)
      return
    for _ in self._batches(reqs, stream=stream, progress=progress):
      pass

  def _text_deltas(self, req: batching.Request) -> Iterator[str]:
    if self.paged:
      return self._paged_deltas(req)
    return (delta for chunk in self._batches([req], stream=True) for _, delta in chunk)

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
        o.cumulative_logprob = _cumulative_logprob(o)
    return req.detok.release(o.text, final=bool(o.finish_reason)) if stream else ""

  @staticmethod
  def _record_logprobs(o: RequestOutput, n: int, tok: int, out, row: int, j: int) -> None:
    step = {int(i): float(v) for i, v in zip(out.top_ids[row, j, :n], out.top_logprobs[row, j, :n])}
    step[tok] = float(out.logprob[row, j])
    o.logprobs.append(step)

  # ---------------------------------------------------------------- engine v2: scripted use

  def add_request(self, prompt, params: SamplingParams | None = None) -> int:
    """Queue one request (a str or a list of token ids); returns its request id (an int, unique
    in this engine). Its RequestOutput comes back from the `step()` in which it ends. A bad
    request raises ValueError naming the field, as `generate` of one prompt does."""
    self._require_paged("add_request")
    if not _is_single_prompt(prompt):
      raise ValueError(f"LLM.add_request: `prompt` expected one str or list of token ids, got "
                       f"{type(prompt).__name__} of prompts")
    with self._lock:
      req = self._requests([prompt], params)[0]
      if req.output.error:
        raise ValueError(req.output.error)
      self._enqueue(req, scripted=True)
      req.output.index = req.output.request_id
      return req.output.request_id

  def step(self) -> list[RequestOutput]:
    """One engine step: schedule, dispatch, read back the previous decode chunk and the first
    tokens of the prompts this step completed. Returns the outputs of the `add_request` requests
    that ended (finished, aborted, or failed) since the last call."""
    self._require_paged("step")
    with self._lock:
      self._step()
      out, self._unreturned = self._unreturned, []
      return out

  def abort(self, request_id: int) -> bool:
    """End a waiting or running request now: finish_reason "abort", its pages freed; its output
    comes back from the next `step()` (for add_request) or `generate`. False when it had already
    ended; ValueError for an id this engine never gave out."""
    self._require_paged("abort")
    with self._lock:
      req = self._live.get(request_id)
      if req is None:
        if isinstance(request_id, numbers.Integral) and 0 <= request_id < self._next_request_id:
          return False
        raise ValueError(f"LLM.abort: `request_id` expected an id from add_request, got "
                         f"{request_id!r}")
      o = req.output
      o.finish_reason, o.text = "abort", req.detok.decode(o.token_ids)
      if o.logprobs is not None:
        o.cumulative_logprob = _cumulative_logprob(o)
      self._ended(req, time.perf_counter())
      return True

  def has_unfinished_requests(self) -> bool:
    return self.paged and bool(self._live)

  @property
  def num_preemptions(self) -> int:
    """Requests preempted (pages freed, recomputed later) since the pool was made."""
    return self.scheduler.num_preemptions if self.paged else 0

  def _require_paged(self, op: str) -> None:
    if not self.paged:
      raise ValueError(f"LLM.{op}: needs engine v2 (page_size set), got page_size=None")

  # ---------------------------------------------------------------- engine v2: running

  def _enqueue(self, req: batching.Request, *, scripted: bool = False,
               stream: bool = False) -> None:
    rid = self._next_request_id
    self._next_request_id += 1
    req.output.request_id, req.scripted, req.stream = rid, scripted, stream
    req.seq = SchedSequence(rid, req.prompt_ids, req.output.token_ids, req.max_tokens)
    self.scheduler.add(req.seq)
    self._live[rid] = req

  def _run_paged(self, reqs, progress) -> None:
    with self._lock:
      todo = [r for r in reqs if not r.finished]
      for r in todo:
        self._enqueue(r)
      pending = {id(r) for r in todo}
      try:
        while pending:
          for r in self._step():
            if id(r) in pending:
              pending.discard(id(r))
              if progress:
                progress(r.output)
      finally:
        for r in todo:  # interrupted: the rest must not hold pages
          self._drop(r)
      if progress:
        for r in reqs:
          if r.output.finish_reason == "error" and r.seq is None:
            progress(r.output)

  def _paged_deltas(self, req: batching.Request) -> Iterator[str]:
    with self._lock:
      self._enqueue(req, stream=True)
      try:
        while True:
          self._step()
          while req.deltas:
            yield req.deltas.popleft()
          if req.finished:
            return
      finally:
        self._drop(req)  # closed early: the text so far stays, unfinished

  def _step(self) -> list[batching.Request]:
    """Schedule and dispatch one step; read back the oldest decode chunk in flight when another
    is queued behind it (or none was dispatched now), then the first tokens this step's prefill
    sampled. Returns the requests that ended since the last call (aborts included)."""
    try:
      plan = self.scheduler.schedule()
      firsts, chunk = self._dispatch(plan) if plan else ([], [])
      if chunk:
        self._in_flight.append(chunk)
      if self._in_flight and (len(self._in_flight) > 1 or not chunk):
        self._read(self._in_flight.popleft())
      elif self.scheduler.has_unfinished() and not plan:
        raise AssertionError("LLM: the scheduler made no progress")  # a bug, never a hang
      self._read(firsts)  # waits for the prefill only: this step's decode chunk runs behind it
    except Exception as e:
      self._fail_all(f"LLM: the engine step failed: {e!r}")
      raise
    ended, self._just_ended = self._just_ended, []
    return ended

  def _dispatch(self, plan) -> tuple[list[_Ran], list[_Ran]]:
    """Run the plan's prefill programs (its chunks split to pad little), then its decode chunk.
    -> (the prefills that sampled first tokens, [the decode chunk] or []); their outputs stay on
    the device."""
    groups = [[plan.chunks[i] for i in group] for group in
              self.paged_buckets.prefill_groups([c.length for c in plan.chunks])]
    inputs = [self._chunk_inputs(group) for group in groups]  # sets new rows' params first
    params, state = self._slot_row_params(), self.paged_programs.state
    cache, slots = self._pool or (self.paged_programs.init_cache(),
                                  self.paged_programs.init_slots())
    self._pool = None  # donated below; a failure leaves no stale buffers behind
    firsts, chunk = [], []
    for group, (x, shape) in zip(groups, inputs):
      program = self.paged_programs.get("paged_prefill", shape)
      cache, slots, out = program(state, cache, slots, params, jax.device_put(x))
      rows = [(i, self._live[c.seq.seq_id]) for i, c in enumerate(group) if c.final]
      if rows:  # chunks that end no prompt sample nothing to read
        firsts.append(_Ran(out, rows, shape[0]))
    if plan.decode:
      tables = [self._table(seq, seq.kv_bound) for seq in plan.decode]
      shape = self.paged_buckets.decode_shape(len(plan.decode), max(map(len, tables)))
      x = batching.decode_inputs(plan.decode, tables, shape, self.max_batch_size)
      program = self.paged_programs.get("paged_decode", shape)
      cache, slots, out = program(state, cache, slots, params, jax.device_put(x))
      chunk.append(_Ran(out, [(i, self._live[seq.seq_id]) for i, seq in enumerate(plan.decode)],
                        shape[0]))
    self._pool = (cache, slots)
    return firsts, chunk

  def _chunk_inputs(self, chunks):
    tables = [self._table(c.seq, c.start + c.length) for c in chunks]
    shape = self.paged_buckets.prefill_shape(len(chunks), max(c.length for c in chunks),
                                             max(map(len, tables)))
    for c in chunks:
      if c.final:
        batching.set_row(self._slot_params, c.seq.slot, self._live[c.seq.seq_id])
        self._device_params = None
    return batching.chunk_inputs(chunks, tables, shape, self.max_batch_size,
                                 self.max_seq_len), shape

  def _table(self, seq: SchedSequence, num_tokens: int) -> list[int]:
    """The pages of seq's block table that hold its first num_tokens positions."""
    return self.block_manager.block_table(seq.seq_id)[:-(-num_tokens // self.page_size)]

  def _slot_row_params(self):
    if self._device_params is None:
      # A copy: on a CPU, device_put may alias the numpy buffers, which set_row changes later.
      self._device_params = jax.device_put(jax.tree.map(np.copy, self._slot_params))
    return self._device_params

  def _read(self, ran: list[_Ran]) -> None:
    """Absorb the tokens of dispatched programs (a decode chunk, or a step's prefills); finished
    requests free their pages. A request's outputs are read in dispatch order: its first token
    in the step of its final prefill chunk, each decode chunk in the step after its own."""
    if not ran:
      return
    outs = jax.device_get([r.out for r in ran])
    now = time.perf_counter()
    for out, r in zip(outs, ran):
      for i, req in r.rows:
        if req.seq.status == FINISHED:  # stopped by an earlier read, aborted, or dropped
          continue
        delta = self._absorb(req, out, i, now, req.stream)
        if delta:
          req.deltas.append(delta)
        req.output.metrics.batch_size = max(req.output.metrics.batch_size, r.batch)
        self.scheduler.on_read(req.seq)
        if req.finished:
          self._ended(req, now)

  def _ended(self, req: batching.Request, now: float) -> None:
    """req has its finish_reason: release its slot and pages; hand its output back."""
    o = req.output
    o.num_cached_tokens = req.seq.num_cached_tokens or 0
    o.metrics.finish_time = o.metrics.finish_time or now
    o.metrics.num_generated_tokens = len(o.token_ids)
    self.scheduler.finish(req.seq)
    del self._live[req.seq.seq_id]
    self._just_ended.append(req)
    if req.scripted:
      self._unreturned.append(o)

  def _drop(self, req: batching.Request) -> None:
    """Forget an unfinished request (a stream closed early): pages freed, no finish_reason."""
    if self._live.pop(req.seq.seq_id, None) is not None:
      self.scheduler.finish(req.seq)

  def _fail_all(self, message: str) -> None:
    """A step raised: every live request ends with an error and the pool starts afresh (its
    buffers may be gone, donated to the failed program)."""
    live, unreturned = list(self._live.values()), self._unreturned
    self._reset_pool()
    for req in live:
      batching.fail(req, message)
      req.seq.status = FINISHED
      if req.scripted:
        unreturned.append(req.output)
    self._unreturned = unreturned

  # ---------------------------------------------------------------- engine v2: warmup

  def _warmup_paged(self, batch_sizes, chunk_lens, table_pages) -> int:
    before = len(self.paged_programs.compiled)
    for kind, shape in self.paged_buckets.programs():
      if (shape[0] in batch_sizes and shape[-1] in table_pages
          and (kind == "paged_decode" or shape[1] in chunk_lens)):
        self.paged_programs.get(kind, shape)
    return len(self.paged_programs.compiled) - before

  def _warmup_paged_for(self, reqs) -> int:
    if not reqs:
      return 0
    b = self.paged_buckets
    up_to = lambda n, rungs: [r for r in rungs if r <= buckets_lib.bucket(n, rungs)]
    longest = max(len(r.prompt_ids) + r.max_tokens for r in reqs)
    return self._warmup_paged(
        up_to(min(len(reqs), self.max_batch_size), b.batch),
        up_to(min(max(len(r.prompt_ids) for r in reqs), self.max_num_batched_tokens), b.chunk),
        up_to(-(-longest // self.page_size), b.pages))


@dataclasses.dataclass(frozen=True)
class _Ran:
  """One dispatched engine v2 program: its output, and the request each counted row serves."""
  out: sampling.StepOutput  # [B, 1] (a prefill: first tokens) or [B, decode_steps]
  rows: list                # [(row, Request)]
  batch: int                # B, the rows of its bucket


class TextStream:
  """Iterator of one request's text deltas; `.output` is its RequestOutput once exhausted."""

  def __init__(self, llm: LLM, req: batching.Request):
    self._deltas = llm._text_deltas(req)
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


def _cumulative_logprob(o: RequestOutput) -> float:
  return float(sum(step[tid] for step, tid in zip(o.logprobs, o.token_ids)))


def _is_single_prompt(prompts) -> bool:
  if isinstance(prompts, str):
    return True
  return (isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts) > 0
          and all(isinstance(t, numbers.Integral) for t in prompts))


def _check_limits(max_batch_size, max_seq_len, decode_steps, *, page_size, num_pages,
                  enable_prefix_caching, max_num_batched_tokens):
  for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                      ("decode_steps", decode_steps),
                      ("max_num_batched_tokens", max_num_batched_tokens)):
    if not _is_int(value) or value < 1:
      raise ValueError(f"LLM: `{name}` expected a positive int, got {value!r}")
  if page_size is not None and (not _is_int(page_size) or page_size < 1):
    raise ValueError(f"LLM: `page_size` expected a positive int or None (engine v1), got "
                     f"{page_size!r}")
  if num_pages is not None and (not _is_int(num_pages) or num_pages < 2):
    raise ValueError(f"LLM: `num_pages` expected an int >= 2 (page 0 is scratch) or None, got "
                     f"{num_pages!r}")
  if not isinstance(enable_prefix_caching, bool):
    raise ValueError(f"LLM: `enable_prefix_caching` expected a bool, got "
                     f"{enable_prefix_caching!r}")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)
