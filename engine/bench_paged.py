"""Engine v2 benchmarks (`python -m engine.bench --suite paged`): what paging, continuous
batching and prefix caching buy, each against the engine without it, at the same KV memory.

  memory      a seeded trace of requests with random prompt and output lengths (greedy,
              ignore_eos, so every output has its drawn length), all queued at once, over a KV
              budget of B tokens. v1 (contiguous, static batches) holds B / max_seq_len slots by
              construction; v2 holds B / page_size pages and as many sequences as they fit.
              Reported: sequences in flight (time average and max), v2 / v1.
  throughput  the same runs: generated tokens / wall time of each, v2 / v1, and the share of
              requests whose greedy tokens are the same in both.
  prefix      M requests sharing a long system prompt + a short distinct suffix; prefill tokens
              computed (prompt - num_cached_tokens) and time to first token, prefix caching off
              vs on. "warm": the first request alone, then the rest together (they hit its
              pages); "cold": all M queued at once (only those admitted after the first chunk
              hit).

In flight = admitted and not finished (holding K/V, prefilling or decoding), time-averaged over
the run. v2: the scheduler's count of running sequences after each step. v1: each row from its
static batch's start (the previous batch's end; a batch = the rows whose first token came in the
same read) to its own finish; a finished row's slot then idles until the batch ends.
Each engine compiles in an untimed pass first (v1: `warmup_for`, its exact programs; v2: the
trace's lengths once with other token ids, since its schedule, which depends on lengths only,
picks the shapes), so compile time is reported apart, and the timed runs report how many
programs they still compiled (0 expected). The accounting behind the expected
ratios: bench/notes/engine.md.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from engine import LLM, SamplingParams

TARGETS = {"in_flight_ratio": 3.0, "throughput_ratio": 1.5}
PREFIX_TOLERANCE = 0.01  # measured prefill reduction may fall this far below the expected one
UNTIMED_VARIANT = 100    # token ids of the untimed passes' traces: variant + this


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark configuration. Lengths are inclusive (low, high) ranges."""
  num_requests: int = 256
  prompt_lens: tuple[int, int] = (32, 512)
  output_lens: tuple[int, int] = (16, 256)
  max_seq_len: int = 2048
  kv_budget_tokens: int = 8 * 2048
  page_size: int = 16
  max_batch_size: int = 64  # v2's decode slots; v1 gets kv_budget_tokens // max_seq_len
  max_num_batched_tokens: int = 512
  decode_steps: int = 16
  prefix_requests: int = 32
  system_len: int = 384
  suffix_lens: tuple[int, int] = (16, 64)
  prefix_output_len: int = 32
  seed: int = 0

  @property
  def v1_slots(self) -> int:
    return self.kv_budget_tokens // self.max_seq_len

  @property
  def num_pages(self) -> int:
    return self.kv_budget_tokens // self.page_size + 1  # + the scratch page

  def check(self) -> None:
    if self.v1_slots < 1:
      raise ValueError(f"bench: `kv_budget_tokens` expected >= max_seq_len ({self.max_seq_len}), "
                       f"got {self.kv_budget_tokens}")
    longest = self.prompt_lens[1] + self.output_lens[1]
    longest_prefix = self.system_len + self.suffix_lens[1] + self.prefix_output_len
    if max(longest, longest_prefix) > self.max_seq_len:
      raise ValueError(f"bench: the longest request ({max(longest, longest_prefix)} tokens) "
                       f"expected <= max_seq_len ({self.max_seq_len})")


# A CPU-sized run (a few minutes on 2 cores once compiled): shorter requests, fewer of them, a
# smaller budget. max_seq_len / mean(prompt + output) is 6.4, near the full run's 4.9: what sets
# the in-flight ratio is how far requests fall short of the longest one allowed.
QUICK = Settings(num_requests=40, prompt_lens=(16, 96), output_lens=(8, 48), max_seq_len=512,
                 kv_budget_tokens=4 * 512, max_batch_size=32, prefix_requests=8, system_len=192,
                 suffix_lens=(8, 32), prefix_output_len=8)


@dataclasses.dataclass(frozen=True)
class TraceRequest:
  prompt: list[int]
  max_tokens: int

  @property
  def params(self) -> SamplingParams:
    return SamplingParams(max_tokens=self.max_tokens, temperature=0, ignore_eos=True)


def token_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
  """n ordinary ids: past the special tokens at the start of a real vocabulary."""
  low = min(1000, vocab_size // 2)
  return rng.integers(low, min(vocab_size, 30000), n).tolist()


def make_trace(s: Settings, vocab_size: int, variant: int = 0) -> list[TraceRequest]:
  """num_requests random lengths; the variant draws other token ids for the same lengths (an
  untimed pass then compiles the timed pass's shapes without leaving it prefix-cache hits)."""
  rng = np.random.default_rng([s.seed, 1])
  prompt_lens = rng.integers(s.prompt_lens[0], s.prompt_lens[1] + 1, s.num_requests)
  output_lens = rng.integers(s.output_lens[0], s.output_lens[1] + 1, s.num_requests)
  ids = np.random.default_rng([s.seed, 1, variant])
  return [TraceRequest(token_ids(ids, int(p), vocab_size), int(n))
          for p, n in zip(prompt_lens, output_lens)]


def make_prefix_trace(s: Settings, vocab_size: int, variant: int) -> list[TraceRequest]:
  """prefix_requests prompts: one system prompt (its own per variant) + distinct suffixes."""
  rng = np.random.default_rng([s.seed, 2, variant])
  system = token_ids(rng, s.system_len, vocab_size)
  suffix_lens = rng.integers(s.suffix_lens[0], s.suffix_lens[1] + 1, s.prefix_requests)
  return [TraceRequest(system + token_ids(rng, int(n), vocab_size), s.prefix_output_len)
          for n in suffix_lens]


# ---------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
  """One timed pass: outputs in trace order, and (v2) the scheduler's state after each step."""
  start: float
  end: float
  outputs: list
  load_avg_1m: float
  compiled: int = 0  # programs compiled during the pass
  preemptions: int = 0
  # v2, after each step: [(time, running sequences, used pages, waiting sequences)]
  samples: list = dataclasses.field(default_factory=list)

  @property
  def wall_s(self) -> float:
    return self.end - self.start


def run_generate(llm: LLM, trace: list[TraceRequest]) -> Run:
  """The whole trace through one `generate` call (v1 plans static batches from it)."""
  load, compiled = os.getloadavg()[0], llm.num_compiled_programs
  start = time.perf_counter()
  outs = llm.generate([r.prompt for r in trace], [r.params for r in trace])
  return Run(start, time.perf_counter(), outs, load, llm.num_compiled_programs - compiled)


def run_stepped(llm: LLM, trace: list[TraceRequest]) -> Run:
  """The whole trace queued at once through add_request, then step() until every request
  ended, reading the scheduler's running and waiting counts and the pool's used pages after
  each step."""
  load, compiled, preempted = os.getloadavg()[0], llm.num_compiled_programs, llm.num_preemptions
  start = time.perf_counter()
  ids = [llm.add_request(r.prompt, r.params) for r in trace]
  done, samples = {}, [(start, 0, 0, len(ids))]
  while len(done) < len(ids):
    done.update((o.request_id, o) for o in llm.step())
    samples.append((time.perf_counter(), len(llm.scheduler.running),
                    llm.block_manager.num_used_pages, len(llm.scheduler.waiting)))
  return Run(start, time.perf_counter(), [done[i] for i in ids], load,
             llm.num_compiled_programs - compiled, llm.num_preemptions - preempted, samples)


def timed(fn: Callable, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - start, out


# ---------------------------------------------------------------- arithmetic


def in_flight(intervals: list[tuple[float, float]], start: float, end: float) -> dict:
  """Sequences in flight over [start, end] from (begin, finish) intervals: the time average
  (busy sequence-seconds / wall seconds) and the most at any instant."""
  busy_s = sum(max(0.0, min(f, end) - max(b, start)) for b, f in intervals)
  # At the same instant an end sorts before a start (-1 < +1): a slot handed over is not two.
  events = sorted([(b, 1) for b, _ in intervals] + [(f, -1) for _, f in intervals])
  live = peak = 0
  for _, delta in events:
    live += delta
    peak = max(peak, live)
  return {"mean": busy_s / (end - start) if end > start else 0.0, "max": peak}


def static_batch_intervals(outputs, start: float) -> list[tuple[float, float]]:
  """v1 runs its batches one after another: a row holds its slot from its batch's start (the
  previous batch's end) to its own finish. A batch = the rows whose first token arrived in the
  same read (one time stamp)."""
  batches = collections.defaultdict(list)
  for o in outputs:
    batches[o.metrics.first_token_time].append(o.metrics.finish_time)
  intervals, begin = [], start
  for first in sorted(batches):
    intervals += [(begin, f) for f in batches[first]]
    begin = max(batches[first])
  return intervals


def time_average(samples: list[tuple], column: int) -> float:
  """Mean of samples[i][column] weighted by how long it held (until the next sample)."""
  total_s = samples[-1][0] - samples[0][0]
  if total_s <= 0:
    return 0.0
  held = sum(a[column] * (b[0] - a[0]) for a, b in zip(samples, samples[1:]))
  return held / total_s


def mean_ttft_ms(outputs) -> float:
  return statistics.fmean(o.metrics.time_to_first_token_s for o in outputs) * 1e3


def generated_tokens(outputs) -> int:
  return sum(len(o.token_ids) for o in outputs)


def run_summary(run: Run, flight: dict) -> dict:
  return {"wall_s": run.wall_s, "generated_tokens": generated_tokens(run.outputs),
          "throughput_tokens_per_s": generated_tokens(run.outputs) / run.wall_s,
          "mean_ttft_ms": mean_ttft_ms(run.outputs), "in_flight_mean": flight["mean"],
          "in_flight_max": flight["max"], "in_flight_mean_queued": flight["mean_queued"],
          "load_avg_1m": run.load_avg_1m, "programs_compiled_while_timed": run.compiled}


def v1_in_flight(run: Run) -> dict:
  """Over the run, and while requests still queued (until the last batch started)."""
  intervals = static_batch_intervals(run.outputs, run.start)
  flight = in_flight(intervals, run.start, run.end)
  last_start = max(b for b, _ in intervals)
  queued = in_flight(intervals, run.start, last_start) if last_start > run.start else None
  return {**flight, "mean_queued": queued and queued["mean"]}


def v2_in_flight(run: Run) -> dict:
  """From the scheduler's running count after each step; "queued": until the step after which
  no request waited any more."""
  drained = next(i for i, sample in enumerate(run.samples) if sample[3] == 0)
  return {"mean": time_average(run.samples, 1), "max": max(s[1] for s in run.samples),
          "mean_queued": time_average(run.samples[:drained + 1], 1) if drained else None}


def pool_summary(run: Run, num_pages: int) -> dict:
  return {"pool_used_mean": time_average(run.samples, 2) / (num_pages - 1),
          "preemptions": run.preemptions}


def expected_in_flight_ratio(s: Settings, trace: list[TraceRequest]) -> dict:
  """Accounting: v1 reserves max_seq_len per sequence, v2 about its own length (prompt +
  output), so v2 fits max_seq_len / mean(prompt + output) times as many, up to its slots."""
  mean_len = statistics.fmean(len(r.prompt) + r.max_tokens for r in trace)
  by_memory = s.max_seq_len / mean_len
  by_slots = s.max_batch_size / s.v1_slots
  return {"mean_request_tokens": mean_len, "by_memory": by_memory, "by_slots": by_slots,
          "expected": min(by_memory, by_slots)}


def same_tokens(a, b) -> float:
  return sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(a)


# ---------------------------------------------------------------- suites


def v1_engine(model, tokenizer, s: Settings, **kw) -> LLM:
  """Static batches: kv_budget_tokens // max_seq_len contiguous rows of max_seq_len."""
  return LLM.from_model(model, tokenizer, max_batch_size=s.v1_slots, page_size=None,
                        max_seq_len=s.max_seq_len, decode_steps=s.decode_steps, **kw)


def v2_engine(model, tokenizer, s: Settings, *, enable_prefix_caching: bool = True,
              **kw) -> LLM:
  """The same KV budget as pages, shared by up to max_batch_size sequences."""
  return LLM.from_model(model, tokenizer, max_batch_size=s.max_batch_size, page_size=s.page_size,
                        num_pages=s.num_pages, max_num_batched_tokens=s.max_num_batched_tokens,
                        max_seq_len=s.max_seq_len, decode_steps=s.decode_steps,
                        enable_prefix_caching=enable_prefix_caching, **kw)


def trace_suite(v1: LLM, v2: LLM, s: Settings, log: Callable[[str], None]) -> dict:
  """The memory and throughput benchmarks: one trace through each engine."""
  trace = make_trace(s, v2.vocab_size)
  log(f"trace: {len(trace)} requests; v1 compiling ...")
  v1_compile_s, _ = timed(v1.warmup_for, [r.prompt for r in trace], [r.params for r in trace])
  log(f"  v1 compile {v1_compile_s:.1f} s; timed run ...")
  r1 = run_generate(v1, trace)
  log(f"  v1 {r1.wall_s:.1f} s; v2 untimed pass ...")
  v2_warm_s, _ = timed(run_stepped, v2, make_trace(s, v2.vocab_size, UNTIMED_VARIANT))
  r2 = run_stepped(v2, trace)
  log(f"  v2 untimed {v2_warm_s:.1f} s, timed {r2.wall_s:.1f} s")
  one = run_summary(r1, v1_in_flight(r1))
  two = run_summary(r2, v2_in_flight(r2))
  one["compile_s"] = v1_compile_s
  two.update(pool_summary(r2, s.num_pages), untimed_pass_s=v2_warm_s,
             compile_s_estimate=max(v2_warm_s - r2.wall_s, 0.0))
  return {"v1": one, "v2": two, "expected": expected_in_flight_ratio(s, trace),
          "in_flight_ratio": two["in_flight_mean"] / one["in_flight_mean"],
          "in_flight_max_ratio": two["in_flight_max"] / one["in_flight_max"],
          "in_flight_queued_ratio": _ratio(two["in_flight_mean_queued"],
                                           one["in_flight_mean_queued"]),
          "throughput_ratio": two["throughput_tokens_per_s"] / one["throughput_tokens_per_s"],
          "same_tokens_requests": same_tokens(r1.outputs, r2.outputs)}


def prefix_protocol(llm: LLM, trace: list[TraceRequest], warm: bool) -> list:
  """warm: the first request alone, then the rest together; else all at once. Outputs in
  trace order."""
  groups = [trace[:1], trace[1:]] if warm else [trace]
  outs = []
  for group in groups:
    outs += llm.generate([r.prompt for r in group], [r.params for r in group])
  return outs


def prefix_stats(outs, timed_outs, load: float) -> dict:
  """Prefill work: prompt tokens minus those the prefix cache served; reduction = the share
  served (caching off computes every prompt token)."""
  prompt = sum(len(o.prompt_token_ids) for o in outs)
  cached = sum(o.num_cached_tokens for o in outs)
  return {"prompt_tokens": prompt, "cached_tokens": cached, "computed_tokens": prompt - cached,
          "reduction": cached / prompt, "mean_ttft_ms": mean_ttft_ms(timed_outs),
          "load_avg_1m": load}


def prefix_case(llm: LLM, s: Settings, warm: bool, variant: int) -> dict:
  """One protocol over the system prompt `variant`, after an untimed pass over another one
  (it compiles the shapes; a system prompt is never timed twice on one engine, so no run finds
  the pages of an earlier one)."""
  prefix_protocol(llm, make_prefix_trace(s, llm.vocab_size, variant + UNTIMED_VARIANT), warm)
  compiled, load = llm.num_compiled_programs, os.getloadavg()[0]
  outs = prefix_protocol(llm, make_prefix_trace(s, llm.vocab_size, variant), warm)
  stats = prefix_stats(outs, outs[1:] if warm else outs, load)
  stats["programs_compiled_while_timed"] = llm.num_compiled_programs - compiled
  return stats


def expected_prefix(s: Settings, trace: list[TraceRequest]) -> dict:
  """Warm protocol: every request after the first finds the system prompt's full pages (a hit
  never covers a prompt's last token, which a suffix of >= 1 token guarantees)."""
  shared = s.system_len // s.page_size * s.page_size
  prompt = sum(len(r.prompt) for r in trace)
  cached = shared * (len(trace) - 1)
  return {"shared_tokens_per_request": shared, "prompt_tokens": prompt,
          "computed_tokens": prompt - cached, "reduction": cached / prompt}


def prefix_suite(on: LLM, off: LLM, s: Settings, log: Callable[[str], None]) -> dict:
  log(f"prefix: {s.prefix_requests} requests, system prompt {s.system_len} tokens ...")
  cases = {"off_warm": prefix_case(off, s, warm=True, variant=0),
           "on_warm": prefix_case(on, s, warm=True, variant=0),
           "on_cold": prefix_case(on, s, warm=False, variant=1)}
  off_tokens = cases["off_warm"]["computed_tokens"]
  expected = expected_prefix(s, make_prefix_trace(s, on.vocab_size, variant=0))
  ttft = cases["off_warm"]["mean_ttft_ms"] / cases["on_warm"]["mean_ttft_ms"]
  log(f"  prefill tokens off {off_tokens}, on (warm) {cases['on_warm']['computed_tokens']} "
      f"(expected {expected['computed_tokens']}); TTFT off/on {ttft:.2f}x")
  return {**cases, "expected": expected, "ttft_speedup_warm": ttft}


def run(model, tokenizer, s: Settings, log: Callable[[str], None] = lambda _: None,
        **engine_kw) -> dict:
  """Every paged benchmark over (model, tokenizer); the report's `paged` section."""
  s.check()
  v2 = v2_engine(model, tokenizer, s, **engine_kw)
  trace = trace_suite(v1_engine(model, tokenizer, s, **engine_kw), v2, s, log)
  # The trace's random prompts share no prefix, so v2 serves as the caching-on engine too.
  off = v2_engine(model, tokenizer, s, enable_prefix_caching=False, **engine_kw)
  prefix = prefix_suite(v2, off, s, log)
  return {"settings": dataclasses.asdict(s), "trace": trace, "prefix": prefix,
          "verdicts": verdicts(trace, prefix)}


def verdicts(trace: dict, prefix: dict) -> dict:
  exp = prefix["expected"]["reduction"]
  return {
      "in_flight_ratio": _verdict(trace["in_flight_ratio"], TARGETS["in_flight_ratio"]),
      "throughput_ratio": _verdict(trace["throughput_ratio"], TARGETS["throughput_ratio"]),
      "prefill_reduction": {"value": prefix["on_warm"]["reduction"], "target": exp,
                            "met": prefix["on_warm"]["reduction"] >= exp - PREFIX_TOLERANCE}}


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def _verdict(value: float, target: float) -> dict:
  return {"value": value, "target": target, "met": value >= target}


# ---------------------------------------------------------------- report


def markdown(p: dict) -> str:
  s, t, x, v = p["settings"], p["trace"], p["prefix"], p["verdicts"]
  lines = ["## Engine v2: paged KV cache, continuous batching, prefix caching", "",
           f"`{p['command']}`, {p['date']}, {p.get('model', '?')} {p.get('dtype', '')}, jax "
           f"{p['jax']}, {p['device']}, {p['cpus']} CPUs, "
           f"load average {p['load_avg_1m_start']:.1f} at start, "
           f"{p.get('load_avg_1m_end', float('nan')):.1f} at end"
           + (" (`--quick`: CPU-sized)" if p.get("quick") else "") + _busy(p), "",
           f"KV budget {s['kv_budget_tokens']} tokens: v1 "
           f"{s['kv_budget_tokens'] // s['max_seq_len']} slots x max_seq_len {s['max_seq_len']}; "
           f"v2 {s['kv_budget_tokens'] // s['page_size']}"
           f" pages x {s['page_size']} (+1 scratch), up to {s['max_batch_size']} sequences. Trace: "
           f"{s['num_requests']} requests, prompts {s['prompt_lens'][0]}..{s['prompt_lens'][1]}, "
           f"outputs {s['output_lens'][0]}..{s['output_lens'][1]} tokens (seed {s['seed']}, "
           f"greedy, ignore_eos), all queued at once.", ""]
  lines += _verdict_lines(v)
  lines += _trace_table(t)
  lines += _prefix_table(x, s)
  return "\n".join(lines) + "\n"


def _busy(p: dict) -> str:
  loads = [p["load_avg_1m_start"], p.get("load_avg_1m_end", 0.0)]
  if max(loads) < p["cpus"]:
    return ""
  return (f". The machine was busy (load average >= its {p['cpus']} CPUs): other processes "
          "shared them, so throughput and TTFT are noisy; the in-flight counts and prefill "
          "tokens hardly depend on it.")


def _verdict_lines(v: dict) -> list[str]:
  word = lambda d: "met" if d["met"] else "MISSED"
  return [f"- memory: sequences in flight v2 / v1 = {v['in_flight_ratio']['value']:.2f}x "
          f"(target >= {v['in_flight_ratio']['target']}x): {word(v['in_flight_ratio'])}",
          f"- throughput: v2 / v1 = {v['throughput_ratio']['value']:.2f}x "
          f"(target >= {v['throughput_ratio']['target']}x): {word(v['throughput_ratio'])}",
          f"- prefix: prefill work reduced by {v['prefill_reduction']['value']:.1%} "
          f"(expected {v['prefill_reduction']['target']:.1%}): {word(v['prefill_reduction'])}",
          ""]


def _trace_table(t: dict) -> list[str]:
  e = t["expected"]
  head = ("| engine | in flight (mean) | while queued | max | throughput tok/s | wall s |"
          " mean TTFT ms | compile s | load |")
  lines = ["### Memory and throughput (same trace, same KV memory)", "", head,
           "|" + "---|" * (head.count("|") - 1)]
  for name, r, compile_s in (("v1 static", t["v1"], t["v1"]["compile_s"]),
                             ("v2 paged", t["v2"], t["v2"]["compile_s_estimate"])):
    lines.append(f"| {name} | {r['in_flight_mean']:.1f} | {_num(r['in_flight_mean_queued'])} | "
                 f"{r['in_flight_max']} | "
                 f"{r['throughput_tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
                 f"{r['mean_ttft_ms']:.0f} | {compile_s:.1f} | {r['load_avg_1m']:.1f} |")
  v2 = t["v2"]
  lines += ["", f"Ratios v2 / v1: in flight {t['in_flight_ratio']:.2f}x (while queued "
            f"{_num(t['in_flight_queued_ratio'], 2)}x, max {t['in_flight_max_ratio']:.2f}x; "
            f"accounting: min(max_seq_len / mean(prompt + "
            f"output) = {e['by_memory']:.2f}, slots {e['by_slots']:.1f}) = {e['expected']:.2f}x), "
            f"throughput {t['throughput_ratio']:.2f}x; same greedy tokens in "
            f"{t['same_tokens_requests']:.0%} of requests.",
            f"v2: {v2['pool_used_mean']:.0%} of the pages in use on average, "
            f"{v2['preemptions']} preemptions. Programs compiled during "
            f"the timed runs: v1 {t['v1']['programs_compiled_while_timed']}, v2 "
            f"{v2['programs_compiled_while_timed']}.", "",
            "In flight: requests admitted and not finished, time-averaged over the run (v2: the "
            "scheduler's running count after each step; v1: each row from its batch's start to "
            "its finish); while queued: the same until no request waits any more (the engine's "
            "capacity, before the trace drains). compile s: v1 `warmup_for`; v2 its untimed "
            "pass minus the timed one. load: 1-minute load average when the timed run started.",
            ""]
  return lines


def _num(x: float | None, digits: int = 1) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def _prefix_table(x: dict, s: dict) -> list[str]:
  e = x["expected"]
  head = ("| prefix caching | protocol | prompt tokens | cached | computed | reduction |"
          " mean TTFT ms |")
  lines = [f"### Prefix reuse ({s['prefix_requests']} requests: a {s['system_len']}-token system "
           f"prompt + {s['suffix_lens'][0]}..{s['suffix_lens'][1]} distinct tokens, "
           f"{s['prefix_output_len']} new tokens each)", "", head,
           "|" + "---|" * (head.count("|") - 1)]
  for key, on, proto in (("off_warm", "off", "warm"), ("on_warm", "on", "warm"),
                         ("on_cold", "on", "cold")):
    c = x[key]
    lines.append(f"| {on} | {proto} | {c['prompt_tokens']} | {c['cached_tokens']} | "
                 f"{c['computed_tokens']} | {c['reduction']:.1%} | {c['mean_ttft_ms']:.0f} |")
  lines += ["", f"Expected (warm): {e['shared_tokens_per_request']} cached tokens per request "
            f"after the first (the system prompt's full pages) -> {e['computed_tokens']} computed, "
            f"a {e['reduction']:.1%} reduction. TTFT off / on (warm): "
            f"{x['ttft_speedup_warm']:.2f}x.",
            "warm: the first request alone, then the others together (TTFT over the others); "
            "cold: all at once, over another system prompt (TTFT over all). reduction: cached / "
            "prompt tokens, the prefill work saved (caching off computes every prompt token).",
            ""]
  return lines
