"""`python -m pallas_kernels.autotune`: time candidate configs on a GPU, write the tuned tables.

For each op folder (`--op`) and each of its CASES, grouped by the tuning key the op's
`resolve` will look up, every candidate config runs through the public op with
impl="triton" and `config=`: candidates that are refused, fail to compile or fail the
correctness gate (against the xla reference, `pallas_kernels.bench.check`) are skipped;
the rest are timed with the benchmark's timer (`pallas_kernels.bench.timing`). Per key the
winner (least geometric-mean time over the key's cases) goes to
`pallas_kernels/ops/<folder>/tuned/<device-slug>.json` through `_core.config.write_table`,
merged with the entries already there. The time of `config=None` (what the op picks today)
is recorded beside it. A log of every trial goes to `bench/results/<date>-<device-slug>/`.

Backward kernels (`--pass`, default `both`: every op's forward keys, then its backward keys;
`forward` or `backward` for one of them; `--list` shows what a run would tune). The backward
keys come from the op's GRAD_CASES, each timed as `_core.specs.grad_of(op)`: forward plus
vjp, what a training step costs. The candidate goes in as `bwd_config=` while `config=None`
resolves the forward as usual, so the forward's share of the time is the same for every
candidate; winners go to the same tuned table under the key the backward's resolve looks up:
  attention      AttentionBwdConfig (config_bwd.py), the forward key + "pass": "backward"
                 (`config_bwd.resolve`); candidates from `config_bwd.bwd_candidates`.
  normalization  NormConfig under kind "rms_bwd" / "layer_bwd" (`config.resolve_bwd`);
                 rows padded wider than 8192 run the XLA backward and are not tuned.
  matmul         not tuned: its dx and dw kernels take no bwd_config; they resolve MatmulConfig
                 from the forward table under their own (m, n, k) and `variant` "dx"/"dw",
                 which no case times, so they run on the heuristic (listed as "not tuned").

Contract with an op folder (all names in its `config.py`, all optional):

  autotune_key(op: str, *args, **kwargs) -> dict
      The tuning key `resolve` looks up for the public call `op(*args, **kwargs)`.
      Arrays may be `jax.ShapeDtypeStruct`s: use shapes and dtypes only.
  candidates(target: _core.device.Target, *args, **kwargs) -> Iterable[Config]
      Configs worth timing for this call on `target`, best guesses first (the list is cut
      at --max-candidates). Without it: a generic grid (`candidates.generic_grid`).
  autotune_default(target, *args, **kwargs) -> Config
      The heuristic's config for this call: always tried, and the centre of the generic grid.

  The config class is the frozen dataclass defined in config.py (one per folder).
  `args, kwargs` come from `case.bind(inputs)`; the public op must accept `impl=` and `config=`.
  A key of None leaves the call's cases out (nothing that config tunes runs for them).

  Backward, tuned from GRAD_CASES (cotangent keywords removed from `kwargs`), in config_bwd.py
  when the folder has one, else config.py; the public op must accept `bwd_config=`:
  autotune_bwd_key(op, *args, **kwargs) -> dict | None
  bwd_candidates(target, *args, **kwargs) -> Iterable[BwdConfig]
  autotune_bwd_default(target, *args, **kwargs) -> BwdConfig
  The config class is that module's one frozen dataclass (config.py's own for normalization).

Without `autotune_key`/`autotune_default`, `adapters.BUILTIN` supplies them for the ops
that exist today (read off their config.py and triton.py), `adapters.BUILTIN_BWD` the
backward's (attention); a folder with neither is listed as not tunable, with the reason.

The generic grid: each field takes its usual values by name (block_*: 16..256, block_rows:
1..64, num_warps*: 1..16, num_stages*: 1..5, *split*: 1..64, group*: 1..16, bools: both;
a suffix such as num_warps_dq names one kernel of a backward config),
other fields keep the default config's value; combinations are ordered by distance from
the default config (a local search around the heuristic) and invalid ones (the dataclass
raises) are dropped.

Tests drive `tuner.tune_key` with a toy op and an injected timer: nothing here needs a GPU
except the timings themselves.
"""
