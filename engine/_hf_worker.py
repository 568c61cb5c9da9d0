"""The Hugging Face transformers side of `python -m engine.bench`, run in its own interpreter.

Started by engine/bench.py as `<--hf-python> engine/_hf_worker.py GGUF_PATH DTYPE`; it never
imports jax or the engine (torch and transformers live in another virtualenv). Protocol, one JSON
object per line: the bench sends {"prompts": [[ids...], ...], "new_tokens": N, "warm": bool} and
reads back {"ttft_s", "decode_s", "total_s", "generated": [[ids...], ...]}; "quit" ends it.

The workload is the engine's: the same prompt ids, greedy, exactly N new tokens (min_new_tokens
= max_new_tokens, so EOS does not end a row early), every prompt the same length (no padding).
Timing uses a streamer, as the engine does: time to first token is from the `generate` call to
the first new token; decode time is from the first to the last new token.
"""

import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer


class _Clock(BaseStreamer):
  """`generate` calls put() once with the prompt, then once per new token (all rows at once)."""

  def __init__(self):
    self.times = []

  def put(self, value):
    self.times.append(time.perf_counter())

  def end(self):
    pass


@torch.no_grad()
def run(model, request):
  prompts = torch.tensor(request["prompts"], dtype=torch.long)
  n = request["new_tokens"]
  clock = _Clock()
  start = time.perf_counter()
  out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, streamer=clock, pad_token_id=0)
  end = time.perf_counter()
  first = clock.times[1]  # times[0] is the prompt
  return {"ttft_s": first - start, "decode_s": clock.times[-1] - first, "total_s": end - start,
          "generated": out[:, prompts.shape[1]:].tolist()}


def main():
  path, dtype = Path(sys.argv[1]), getattr(torch, sys.argv[2])
  model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=dtype).eval()
  print(json.dumps({"ready": True, "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    if request == "quit":
      break
    print(json.dumps(run(model, request)), flush=True)


if __name__ == "__main__":
  main()
