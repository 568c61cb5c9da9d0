"""Pallax inference engine: `from engine import LLM, SamplingParams`.

  llm = LLM("smollm2-135m")
  out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))[0]
  print(out.text, out.finish_reason, out.metrics.decode_tokens_per_s)

  rid = llm.add_request("Hi", SamplingParams(max_tokens=8))  # scripted: step() returns the
  while llm.has_unfinished_requests():                       # outputs as requests end
    outs = llm.step()

CLI: `python -m engine generate --prompt "..."`; benchmark: `python -m engine.bench`.
Design and decisions: engine/README.md.
"""

from engine.llm import LLM, TextStream
from engine.outputs import RequestMetrics, RequestOutput
from engine.params import SamplingParams

__all__ = ["LLM", "RequestMetrics", "RequestOutput", "SamplingParams", "TextStream"]
