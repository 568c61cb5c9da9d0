"""`python -m engine generate`: text from a prompt, a chat message, or a JSONL file of prompts.

  python -m engine generate --prompt "Write a haiku about GPUs." --chat
  python -m engine generate --prompt "Once upon a time" --max-tokens 128 --stream
  python -m engine generate --input prompts.jsonl --output out.jsonl

The text goes to stdout; time to first token and decode tokens/s go to stderr. Programs are
compiled before the clock starts (and cached on disk, see --compile-cache), so the numbers are
those of a warm engine. JSONL input: one request per line, a string or an object with "prompt"
(str or token ids) or "messages" (a chat), plus any SamplingParams field to override the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "pallax", "jax")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="generate text", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="the prompt text")
  src.add_argument("--input", help="JSONL file of requests (see above)")
  g.add_argument("--output", help="JSONL file for the results of --input (default: stdout)")
  g.add_argument("--model", default="smollm2-135m", help="model name or path (models.load)")
  g.add_argument("--chat", action="store_true", help="apply the model's chat template")
  g.add_argument("--system", help="system message for --chat")
  g.add_argument("--max-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--min-p", type=float, default=0.0)
  g.add_argument("--repetition-penalty", type=float, default=1.1,
                 help="> 1 discourages repeats (a small model's greedy loops)")
  g.add_argument("--seed", type=int)
  g.add_argument("--stop", action="append", help="stop string (repeatable)")
  g.add_argument("--stream", action="store_true", help="print text as it is generated")
  g.add_argument("--dtype", choices=["float32", "bfloat16"], help="model dtype")
  g.add_argument("--impl", help="kernel implementation for the model (e.g. xla, triton)")
  g.add_argument("--max-batch-size", type=int, default=8)
  g.add_argument("--max-seq-len", type=int, default=2048)
  g.add_argument("--page-size", type=int, default=16,
                 help="tokens per KV page (engine v2); 0 = engine v1, static batches")
  g.add_argument("--num-pages", type=int,
                 help="KV pages in the pool (default: max-batch-size x max-seq-len tokens)")
  g.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt pages")
  g.add_argument("--max-num-batched-tokens", type=int, default=512,
                 help="prompt tokens prefilled per step (engine v2)")
  g.add_argument("--compile-cache", default=DEFAULT_CACHE,
                 help="directory of jax's persistent compilation cache ('' = off)")
  return parser


def main(argv=None, *, llm=None) -> int:
  """Entry point; `llm` injects an engine (tests)."""
  args = build_parser().parse_args(argv)
  from engine import LLM, SamplingParams  # after argparse: --help stays fast
  if args.compile_cache:
    enable_compile_cache(args.compile_cache)
  try:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=args.stop)
    requests = (_read_jsonl(args.input, params) if args.input
                else [(_prompt_request(args), params)])
    if llm is None:
      _log(f"loading {args.model} ...")
      llm = LLM(args.model, dtype=args.dtype, max_batch_size=args.max_batch_size,
                max_seq_len=args.max_seq_len, impl=args.impl, page_size=args.page_size or None,
                num_pages=args.num_pages, enable_prefix_caching=not args.no_prefix_caching,
                max_num_batched_tokens=args.max_num_batched_tokens)
    prompts = [_to_prompt(llm, p) for p, _ in requests]
  except (ValueError, OSError) as e:
    _log(f"error: {e}")
    return 2
  _warmup(llm, prompts, [p for _, p in requests])
  if args.input:
    return _run_file(llm, prompts, [p for _, p in requests], args.output)
  return _run_one(llm, prompts[0], params, args.stream)


def enable_compile_cache(path: str) -> None:
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _prompt_request(args):
  if not args.chat:
    return args.prompt
  messages = [{"role": "system", "content": args.system}] if args.system else []
  return messages + [{"role": "user", "content": args.prompt}]


def _to_prompt(llm, prompt):
  """A chat (list of message dicts) becomes token ids; text and token ids pass through."""
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
    return llm.chat_prompt(prompt)
  return prompt


def _read_jsonl(path: str, defaults):
  from engine import SamplingParams
  fields = {f.name for f in dataclasses.fields(SamplingParams)}
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      item = json.loads(line)
      if isinstance(item, str):
        item = {"prompt": item}
      if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
        raise ValueError(f"{path}:{n}: expected a string or an object with 'prompt' or "
                         f"'messages', got {line.strip()[:80]!r}")
      overrides = {k: v for k, v in item.items() if k in fields}
      params = dataclasses.replace(defaults, **overrides) if overrides else defaults
      out.append((item.get("prompt", item.get("messages")), params))
  return out


def _warmup(llm, prompts, params) -> None:
  """Compile the programs this run needs before the clock starts."""
  t = time.perf_counter()
  n = llm.warmup_for(prompts, params)
  if n:
    _log(f"compiled {n} programs in {time.perf_counter() - t:.1f} s")


def _run_one(llm, prompt, params, stream: bool) -> int:
  try:
    if stream:
      s = llm.stream(prompt, params)
      for delta in s:
        sys.stdout.write(delta)
        sys.stdout.flush()
      sys.stdout.write("\n")
      out = s.output
    else:
      out = llm.generate(prompt, params)[0]
      print(out.text)
  except ValueError as e:
    _log(f"error: {e}")
    return 2
  _log(_summary(out))
  return 0


def _run_file(llm, prompts, params, output: str | None) -> int:
  from tqdm import tqdm
  t = time.perf_counter()
  with tqdm(total=len(prompts), desc="generating", unit="req", file=sys.stderr) as bar:
    outs = llm.generate(prompts, params, progress=lambda _: bar.update(1))
  elapsed = time.perf_counter() - t
  lines = [json.dumps(o.as_dict(), ensure_ascii=False) for o in outs]
  if output:
    with open(output, "w") as f:
      f.write("\n".join(lines) + "\n")
  else:
    print("\n".join(lines))
  generated = sum(len(o.token_ids) for o in outs)
  errors = sum(o.finish_reason == "error" for o in outs)
  _log(f"{len(outs)} requests ({errors} errors), {generated} tokens in {elapsed:.2f} s: "
       f"{generated / elapsed:.1f} tokens/s overall")
  return 1 if errors else 0


def _summary(out) -> str:
  m = out.metrics
  ttft = m.time_to_first_token_s
  tps = m.decode_tokens_per_s
  return (f"[{m.num_generated_tokens} tokens, finish_reason={out.finish_reason}] "
          f"time to first token: {ttft * 1e3:.0f} ms, decode: "
          f"{f'{tps:.1f} tokens/s' if tps else 'n/a'}")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)
