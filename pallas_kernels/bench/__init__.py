"""`python -m pallas_kernels.bench`: every op's CASES, our kernels against their peers, on a GPU.

Per case: the public op with impl="triton" (and "mosaic" where the op offers it) and every
peer of `specs.peers()`, each checked once against the xla reference and then timed
(median device time of many calls), beside the roofline measured in the same run.
Results go to `bench/results/<date>-<device-slug>/` as JSON, Markdown and a PNG plot.
On a machine without a GPU it times nothing (interpret mode and CPU XLA say nothing about
GPU kernels) and lists the cases it would run. See bench/README.md.

Modules: registry (op folders, cases, peers), timing (CUPTI and wall-clock timers),
roofline (measured ceilings, floor times), check (the correctness gate), runner (one case),
report (JSON, Markdown, plot). `pallas_kernels.autotune` reuses all but report's tables.
"""
