"""Group cases by tuning key, time every candidate per key, pick and write the winners."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from pallas_kernels._core import config as config_lib
from pallas_kernels.autotune import candidates as candidates_lib
from pallas_kernels.autotune.adapters import Adapter
from pallas_kernels.bench import check, runner, timing
from pallas_kernels.bench.registry import short_error

DEFAULT_CASES_PER_KEY = 2


@dataclasses.dataclass
class Trial:
  config: Any                     # None: what the op resolves today (config= or bwd_config=)
  status: str = runner.OK         # runner's statuses: ok, wrong, refused, error
  ms: dict[str, float] = dataclasses.field(default_factory=dict)  # case label -> median ms
  error: str | None = None

  @property
  def score_ms(self) -> float:
    """Geometric mean over the key's cases: every case counts alike, whatever its size."""
    if self.status != runner.OK or not self.ms:
      return math.inf
    return math.exp(sum(math.log(v) for v in self.ms.values()) / len(self.ms))


@dataclasses.dataclass
class KeyResult:
  op: str
  key: dict
  cases: list[str]
  trials: list[Trial]
  current: Trial                  # config=None
  winner: Trial | None = None

  def entry(self) -> dict:
    """The tuned-table entry (`_core.config` reads `key` and `config`; the rest is the record)."""
    return {"key": jsonable_key(self.key), "config": config_lib.as_dict(self.winner.config),
            "time_ms": self.winner.score_ms, "current_ms": _finite(self.current.score_ms),
            "op": self.op, "cases": self.cases, "tried": len(self.trials),
            "passed": sum(t.status == runner.OK for t in self.trials)}


def _finite(x: float) -> float | None:
  return x if math.isfinite(x) else None


def jsonable_key(key: Mapping[str, Any]) -> dict:
  """Values as JSON has them; anything else as str(), which is how `_core.config` compares keys."""
  return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
          for k, v in key.items()}


def frozen(key: Mapping[str, Any]) -> tuple:
  """`_core.config`'s identity of a key: sorted (name, str(value)) pairs."""
  return tuple(sorted((k, str(v)) for k, v in key.items()))


def spread(cases: Sequence, count: int) -> list:
  """`count` cases evenly spaced by size (flops + bytes), smallest and largest included."""
  ordered = sorted(cases, key=lambda c: c.flops + c.bytes_moved)
  if len(ordered) <= count:
    return ordered
  if count == 1:
    return ordered[-1:]
  return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


def group_by_key(adapter: Adapter, cases: Sequence, cases_per_key: int = DEFAULT_CASES_PER_KEY
                 ) -> list[tuple[dict, list]]:
  """Cases of `adapter.op` by tuning key (from abstract inputs); `spread` picks the ones timed.

  A backward adapter takes the folder's GRAD_CASES, a forward one its CASES. A key of None
  means the call runs no kernel that config tunes (a norm row too wide for the backward
  kernel runs the XLA backward): its cases are left out."""
  groups: dict[tuple, tuple[dict, list]] = {}
  for case in cases:
    if case.op != adapter.op or adapter.folder.is_grad_case(case) != adapter.backward:
      continue
    args, kwargs = adapter.folder.bind(case, case.abstract_inputs())
    key = adapter.key(*args, **kwargs)
    if key is not None:
      groups.setdefault(frozen(key), (key, []))[1].append(case)
  return [(key, spread(members, cases_per_key)) for key, members in groups.values()]


def _trial(adapter: Adapter, config, prepared, timer, rtol) -> Trial:
  """One config over every case of a key; stops at the first case it fails. A backward
  adapter's config goes in as `bwd_config=` (the forward's `config=None` resolves as usual),
  and `folder.bound` times its grad cases as `grad_of(op)`."""
  public = functools.partial(adapter.folder.public_fn(adapter.op), impl=adapter.impl,
                             **{adapter.config_kwarg: config})
  trial = Trial(config)
  for case, input_sets, ref in prepared:
    contender = runner.Contender(f"{adapter.impl} {config}", "ours",
                                 adapter.folder.bound(case, public), config)
    row = runner.run_contender(contender, case, input_sets, ref, timer, None, rtol)
    if row is None or row.status != runner.OK:
      trial.status = row.status if row is not None else runner.REFUSED
      trial.error = row.error if row is not None else f"impl={adapter.impl!r} not offered"
      if row is not None and row.status == runner.WRONG:
        trial.error = f"rel err {row.rel_err:.2e} > {row.tolerance:.1e}"
      return trial
    trial.ms[case.label] = row.ms
  return trial


def tune_key(adapter: Adapter, key: dict, cases: Sequence, target, timer, *,
             limit: int = candidates_lib.DEFAULT_LIMIT, rtol: float | None = None,
             rotate_bytes: int = timing.ROTATE_BYTES,
             log: Callable[[str], Any] = print) -> KeyResult:
  folder = adapter.folder
  try:
    peers = folder.peers()
  except Exception:
    peers = {}
  prepared = []
  for case in cases:
    input_sets = timing.make_input_sets(case, rotate_bytes)
    ref = check.to_host(jax.jit(runner.reference_fn(folder, case, peers))(*input_sets[0]))
    prepared.append((case, input_sets, ref))
  args, kwargs = folder.bind(cases[0], cases[0].abstract_inputs())
  configs = candidates_lib.enumerate_configs(adapter, target, args, kwargs, limit)
  result = KeyResult(adapter.op, key, [c.label for c in cases], [],
                     _trial(adapter, None, prepared, timer, rtol))
  for config in configs:
    trial = _trial(adapter, config, prepared, timer, rtol)
    result.trials.append(trial)
    shown = f"{trial.score_ms:.4f} ms" if trial.status == runner.OK else trial.status
    log(f"    {shown:<12} {config}" + (f"  ({trial.error[:120]})" if trial.error else ""))
  passed = [t for t in result.trials if t.status == runner.OK]
  result.winner = min(passed, key=lambda t: t.score_ms) if passed else None
  return result


def merged_entries(path: Path, new_entries: Sequence[dict]) -> list[dict]:
  """Entries already in the table whose key is not re-tuned, then the new ones, sorted by key."""
  old = []
  if path.exists():
    table = json.loads(path.read_text())
    if table.get("version") == config_lib.TABLE_VERSION:
      old = table.get("entries", [])
  fresh = {frozen(e["key"]) for e in new_entries}
  kept = [e for e in old if frozen(e["key"]) not in fresh]
  return sorted(kept + list(new_entries), key=lambda e: json.dumps(e["key"], sort_keys=True))


def write_winners(op_dir: Path, op_name: str, device_kind: str, results: Sequence[KeyResult]
                  ) -> Path | None:
  """Merge the winners into `op_dir/tuned/<device-slug>.json` through `_core.config.write_table`."""
  entries = [r.entry() for r in results if r.winner is not None]
  if not entries:
    return None
  path = config_lib.tuned_path(op_dir, device_kind)
  return config_lib.write_table(op_dir, op_name, device_kind, jax.__version__,
                                merged_entries(path, entries))


def trial_record(trial: Trial) -> dict:
  return {"config": None if trial.config is None else config_lib.as_dict(trial.config),
          "status": trial.status, "score_ms": _finite(trial.score_ms), "ms": trial.ms,
          "error": trial.error}


def log_record(result: KeyResult) -> dict:
  return {"op": result.op, "key": jsonable_key(result.key), "cases": result.cases,
          "current": trial_record(result.current),
          "winner": trial_record(result.winner) if result.winner else None,
          "trials": [trial_record(t) for t in result.trials]}


def error_result(adapter: Adapter, key: dict, cases: Sequence, exc: BaseException) -> KeyResult:
  """A key whose preparation failed (reference, inputs): recorded, no winner."""
  failed = Trial(None, runner.ERROR, error=short_error(exc))
  return KeyResult(adapter.op, key, [c.label for c in cases], [], failed)
