"""The offline GPU audit: extraction, compilation, thresholds and exit status, on toy kernels
defined here, then one real case per op folder present, then the Mosaic GPU rows (on the real
attention op's `impl="mosaic"`, the one Mosaic kernel in the tree)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels._core import compat
from pallas_kernels._core.specs import Case
from pallas_kernels.audit import __main__ as cli
from pallas_kernels.audit import mosaic, registry, report, run, ttir_compat
from pallas_kernels.audit.compile import CompileJob, ParseError, Resources, compile_kernel
from pallas_kernels.audit.targets import TARGETS

SM80, SM90 = TARGETS["sm80"], TARGETS["sm90"]


# ---- toy kernels --------------------------------------------------------------------------------

def _matmul_kernel(x_ref, y_ref, o_ref):  # x [64, 64], y [64, 64], o [64, 64]
  acc = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)  # tt.dot
  o_ref[...] = acc.astype(o_ref.dtype)


def toy_matmul(x, y, **unused):
  m, n = x.shape[0], y.shape[1]
  return pl.pallas_call(
      _matmul_kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(m // 64, n // 64),
      in_specs=[pl.BlockSpec((64, 64), lambda i, j: (i, 0)),
                pl.BlockSpec((64, 64), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((64, 64), lambda i, j: (i, j)),
      compiler_params=compat.triton_params(num_warps=4, num_stages=2), name="toy_matmul")(x, y)


def _scale_kernel(x_ref, o_ref):  # x [256], o [256]
  o_ref[...] = x_ref[...] * 2.0 + 1.0


def toy_elementwise(x, **unused):
  return pl.pallas_call(
      _scale_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // 256,),
      in_specs=[pl.BlockSpec((256,), lambda i: (i,))],
      out_specs=pl.BlockSpec((256,), lambda i: (i,)),
      compiler_params=compat.triton_params(num_warps=4, num_stages=1), name="toy_scale")(x)


def _deep_kernel(x_ref, y_ref, o_ref, *, block_k):  # x [128, K], y [K, 128], o [128, 128]
  def body(i, acc):
    x = x_ref[:, pl.ds(i * block_k, block_k)]  # [128, block_k]
    y = y_ref[pl.ds(i * block_k, block_k), :]  # [block_k, 128]
    return acc + jnp.dot(x, y, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros((128, 128), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def toy_deep_pipeline(x, y, **unused):
  """8 pipeline stages of 32 KB (128x64 + 64x128 bf16): 224 KB of shared memory, over the
  A100's 163 KB; a 128x128 fp32 accumulator on 4 warps also spills."""
  return pl.pallas_call(
      functools.partial(_deep_kernel, block_k=64),
      out_shape=jax.ShapeDtypeStruct((128, 128), x.dtype),
      compiler_params=compat.triton_params(num_warps=4, num_stages=8),
      name="toy_deep_pipeline")(x, y)


def _hinted_kernel(x_ref, o_ref):  # x [256], o [256]
  from jax.experimental.pallas import triton as plt
  x = plt.load(x_ref.at[...], eviction_policy="evict_first")
  plt.store(o_ref.at[...], x + 1.0, eviction_policy="evict_last")


def toy_hinted(x, **unused):
  return pl.pallas_call(_hinted_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                        name="toy_hinted")(x)


def _abstract(*shapes_dtypes):
  return tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes)


MATMUL_ARGS = _abstract(((128, 64), jnp.bfloat16), ((64, 128), jnp.bfloat16))


def _compile(kernel, target) -> Resources:
  return compile_kernel(CompileJob(kernel.name, kernel.ttir, target.compute_capability,
                                   kernel.num_warps, kernel.num_stages))


@pytest.fixture(scope="module")
def toy_matmul_kernels():
  return {t.key: run.lower(toy_matmul, MATMUL_ARGS, {}, t) for t in (SM80, SM90)}


# ---- extraction ---------------------------------------------------------------------------------

def test_extraction_finds_the_kernel_and_its_launch_parameters(toy_matmul_kernels):
  [kernel] = toy_matmul_kernels["sm90"]
  assert kernel.name == "toy_matmul"
  assert (kernel.num_warps, kernel.num_stages, kernel.grid) == (4, 2, (2, 2, 1))
  assert kernel.num_dots == 1
  assert kernel.ttir.startswith("module") and "tt.func" in kernel.ttir
  assert "loc(" not in kernel.ttir  # printed without locations: the wheel's parser takes it


def test_extraction_finds_every_kernel_of_a_function():
  def two_kernels(x):
    return toy_elementwise(toy_elementwise(x) * 3.0)
  kernels = run.lower(two_kernels, _abstract(((1024,), jnp.float32)), {}, SM80)
  assert [k.name for k in kernels] == ["toy_scale", "toy_scale"]
  assert kernels[0].grid == (4, 1, 1) and kernels[0].num_dots == 0


# ---- compilation --------------------------------------------------------------------------------

def test_matmul_uses_wgmma_on_sm90_and_mma_on_sm80(toy_matmul_kernels):
  hopper = _compile(toy_matmul_kernels["sm90"][0], SM90)
  ampere = _compile(toy_matmul_kernels["sm80"][0], SM80)
  assert hopper.wgmma > 0
  assert ampere.mma_sync > 0 and ampere.wgmma == 0
  for r in (hopper, ampere):
    assert r.shared_bytes > 0 and 0 < r.registers <= 255
    assert r.spill_bytes == 0 and r.source == "ptxas -v"


def test_elementwise_kernel_row_is_clean():
  [kernel] = run.lower(toy_elementwise, _abstract(((1024,), jnp.float32)), {}, SM90)
  row = report.Row("toy", "elementwise", kernel.name, "sm90", kernel.num_warps, kernel.num_stages,
                   kernel.grid, kernel.num_dots, _compile(kernel, SM90))
  report.finish(row)
  assert row.tensor_cores == "n.a." and row.problems == [] and row.status == "ok"
  assert row.occupancy.warps_per_sm == 64  # 4 warps, few registers, no shared memory


def test_old_cache_hint_syntax_is_rewritten_and_compiles(tmp_path):
  [kernel] = run.lower(toy_hinted, _abstract(((256,), jnp.float32)), {}, SM90)
  # jaxlib 0.11 prints the keyword syntax, which the rewrite turns into triton 3.9's
  # attribute; jaxlib 0.12 already prints the attribute, which the rewrite must leave alone.
  old_syntax = "evictionPolicy = evict_first" in kernel.ttir
  assert old_syntax or "eviction_policy = evict_first>}" in kernel.ttir
  rewritten = ttir_compat.new_cache_hints(kernel.ttir)
  assert "eviction_policy = evict_first>}" in rewritten and "evictionPolicy" not in rewritten
  if not old_syntax:
    assert rewritten == kernel.ttir
  prefix = str(tmp_path / "hinted")
  compile_kernel(CompileJob(kernel.name, kernel.ttir, 90, kernel.num_warps, kernel.num_stages,
                            keep_prefix=prefix))
  ptx = (tmp_path / "hinted.ptx").read_text()
  assert "L1::evict_first" in ptx and "L1::evict_last" in ptx  # the hints survive the rewrite


def test_unparseable_ir_reports_the_parser_message():
  job = CompileJob("bad", "module {\n  tt.func public @bad() {\n    tt.bogus\n  }\n}\n", 90, 4, 1)
  with pytest.raises(ParseError, match=r"bad\.ttir.*3:\d+"):
    compile_kernel(job)


# ---- thresholds ---------------------------------------------------------------------------------

def _resources(**overrides) -> Resources:
  base = dict(registers=128, spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0, local_bytes=0,
              shared_dynamic_bytes=64 * 1024, shared_static_bytes=0, wgmma=4, mma_sync=0,
              compile_s=1.0, source="ptxas -v")
  return Resources(**{**base, **overrides})


def _row(target="sm90", num_dots=1, **overrides) -> report.Row:
  return report.finish(report.Row("op", "case", "k", target, 4, 3, (1, 1, 1), num_dots,
                                  _resources(**overrides)))


def test_thresholds():
  assert _row().problems == []
  assert "spills" in _row(spill_store_bytes=8, spill_load_bytes=8).status
  # 200 KB fits an H100 block (227 KB) but not an A100 one (163 KB).
  assert _row("sm90", shared_dynamic_bytes=200 * 1024).problems == []
  assert "shared memory 200 KB > 163 KB" in _row("sm80", shared_dynamic_bytes=200 * 1024).status
  assert "tt.dot without a tensor-core" in _row(wgmma=0).status
  assert _row(num_dots=0, wgmma=0).problems == []           # no dot: tensor cores n.a.
  assert _row(wgmma=0, mma_sync=8).tensor_cores == "yes (mma)"
  assert report.failed([_row(), _row(spill_store_bytes=4)])
  error_row = report.finish(report.Row("op", "case", "-", "sm80", error="lowering failed: boom"))
  assert error_row.status == "ERROR" and report.failed([error_row])


def test_occupancy():
  full = report.occupancy(SM90, num_warps=4, registers=255, shared_bytes=0)
  assert (full.blocks_per_sm, full.warps_per_sm, full.limiter) == (2, 8, "regs")
  smem = report.occupancy(SM80, num_warps=4, registers=32, shared_bytes=80 * 1024)
  assert (smem.blocks_per_sm, smem.limiter) == (2, "smem")  # 2 x (80 + 1) KB <= 164 KB
  assert report.occupancy(SM80, num_warps=8, registers=32, shared_bytes=0).percent == 100.0


def _toy_case(op, fn, args, label="toy") -> registry.AuditCase:
  case = Case(op=op, label=label, make_inputs=lambda key: args, audit=True)
  return registry.AuditCase("toy", case, fn)


def test_exit_status_fails_on_a_kernel_over_shared_memory(monkeypatch, tmp_path, capsys):
  x = jnp.zeros((128, 1024), jnp.bfloat16)
  deep = _toy_case("toy_deep_pipeline", toy_deep_pipeline, (x, x.T))
  monkeypatch.setattr(registry, "audit_cases", lambda *a, **k: [deep])
  out = tmp_path / "rows.json"
  assert cli.main(["--target", "sm80", "--jobs", "1", "--json", str(out)]) == 1
  [row] = json.loads(out.read_text())["rows"]
  assert row["resources"]["shared_bytes"] > SM80.max_shared_per_block
  assert "shared memory" in row["status"] and "spills" in row["status"]
  assert "FAIL" in capsys.readouterr().out


def test_exit_status_fails_on_a_case_that_does_not_lower(monkeypatch, capsys):
  def odd_block(x, **unused):  # a block of 96: the Triton lowering wants powers of two
    return pl.pallas_call(_scale_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          in_specs=[pl.BlockSpec((96,), lambda: (0,))],
                          out_specs=pl.BlockSpec((96,), lambda: (0,)))(x)
  bad = _toy_case("odd_block", odd_block, (jnp.zeros((96,), jnp.float32),))
  monkeypatch.setattr(registry, "audit_cases", lambda *a, **k: [bad])
  assert cli.main(["--target", "sm90", "--jobs", "1"]) == 1
  captured = capsys.readouterr()
  assert "ERROR" in captured.out and "lowering failed" in captured.err


def test_clean_toy_audit_passes_and_keeps_artifacts(monkeypatch, tmp_path):
  case = _toy_case("toy_matmul", toy_matmul, (jnp.zeros((128, 64), jnp.bfloat16),
                                              jnp.zeros((64, 128), jnp.bfloat16)))
  monkeypatch.setattr(registry, "audit_cases", lambda *a, **k: [case])
  assert cli.main(["--target", "sm90", "--jobs", "1", "--keep", str(tmp_path)]) == 0
  kept = sorted(p.suffix for p in tmp_path.rglob("*.sm90.*"))
  assert kept == [".cubin", ".ptx", ".ttgir", ".ttir"]


# ---- registry -----------------------------------------------------------------------------------

def test_missing_op_folder_is_a_note(monkeypatch):
  monkeypatch.setitem(registry.OP_FOLDERS, "not_written_yet", "not_written_yet")
  notes = []
  registry.audit_cases("not_written_yet", notes)
  assert notes == ["pallas_kernels.ops.not_written_yet (specs.py) not found: its ops are not audited"]


def test_op_folder_that_fails_to_import_is_an_error(monkeypatch):
  def broken(name):
    raise SyntaxError("half-written")
  monkeypatch.setattr(registry, "folders", lambda: ["normalization"])
  monkeypatch.setattr(registry.importlib, "import_module", broken)
  errors = []
  assert registry.audit_cases(None, [], errors) == []
  assert errors == ["pallas_kernels.ops.normalization: SyntaxError: half-written"]


def test_split_args_passes_trailing_arrays_as_keywords():
  @dataclasses.dataclass(frozen=True)
  class WithResidual(Case):
    array_kwargs: tuple = ("residual",)
  case = WithResidual(op="rms_norm", label="x", make_inputs=lambda key: (1, 2, 3))
  assert registry.split_args(case, (1, 2, 3)) == ((1, 2), {"residual": 3})
  plain = Case(op="attention", label="x", make_inputs=lambda key: (1, 2))
  assert registry.split_args(plain, (1, 2)) == ((1, 2), {})


# ---- one real case per op folder ----------------------------------------------------------------

def _folder_param(folder: str, slow: bool):
  present = importlib.util.find_spec(f"pallas_kernels.ops.{folder}") is not None
  marks = [pytest.mark.skipif(not present, reason=f"pallas_kernels/ops/{folder} not written yet")]
  return pytest.param(folder, marks=marks + ([pytest.mark.slow] if slow else []), id=folder)


@pytest.mark.parametrize("folder", [
    _folder_param("normalization", slow=False),
    _folder_param("matmul", slow=False),
    _folder_param("decode_attention", slow=False),
    _folder_param("attention", slow=True),  # 8 s on an idle core, 30 s on a loaded one
])
def test_real_op_case_lowers_and_compiles(folder):
  cases = registry.audit_cases(folder)
  assert cases, f"{folder}: no audit=True case"
  [case] = cases[:1]
  rows = run.audit([case], [SM90], jobs=1, progress=lambda msg: None)
  assert rows and not [r.error for r in rows if r.error]
  for row in rows:
    assert row.resources.registers > 0 and row.occupancy.warps_per_sm > 0
    if row.num_dots:
      assert row.tensor_cores.startswith("yes")


# ---- Mosaic GPU rows ----------------------------------------------------------------------------

_HAS_MOSAIC_ATTENTION = importlib.util.find_spec("pallas_kernels.ops.attention.mosaic") is not None
needs_mosaic_attention = pytest.mark.skipif(not _HAS_MOSAIC_ATTENTION,
                                            reason="pallas_kernels/ops/attention/mosaic.py absent")


def test_implementations_are_read_from_each_public_op():
  from pallas_kernels.ops.matmul import api as matmul_api
  assert registry.implementations(matmul_api.matmul) == matmul_api._MATMUL_IMPLS
  assert registry.implementations(matmul_api.gated_matmul) == matmul_api._GATED_IMPLS
  assert registry.implementations(toy_matmul) == ()  # no dispatch: no Mosaic row
  assert registry.mosaic_implementation(toy_matmul) is None


@needs_mosaic_attention
def test_mosaic_cases_are_the_cases_mosaic_accepts():
  notes, errors = [], []
  cases = registry.audit_cases("attention")
  found = registry.mosaic_cases(cases, notes, errors)
  assert found and errors == []
  assert all(c.hopper_only and c.wgmma_expected and c.folder == "attention" for c in found)
  heads = {c.case.abstract_inputs()[0].shape[-1] for c in found}
  assert heads <= {64, 128}  # what attention.mosaic.refuses accepts
  # Backward cases too, judged without their cotangent and lowered as grad_of(attention).
  grads = {c.case.label: c.fn for c in found if c.case.array_kwargs == ("cotangent",)}
  assert grads and all(fn is not registry.public_op("attention") for fn in grads.values())
  [note] = notes  # head_dim 96 and 256 are refused, each with its reason
  assert "refuses" in note and "got 96" in note and "got 256" in note


@pytest.fixture(scope="module")
def llama_mosaic_case():
  cases = registry.mosaic_cases(registry.audit_cases("attention"))
  [case] = [c for c in cases if c.case.abstract_inputs()[0].shape[-1] == 128][:1]
  return case


@pytest.fixture(scope="module")
def llama_mosaic_rows(llama_mosaic_case):
  return run.mosaic_audit([llama_mosaic_case], [SM80, SM90], progress=lambda msg: None)


@needs_mosaic_attention
def test_mosaic_rows_of_a_real_case(llama_mosaic_rows):
  from pallas_kernels.ops.attention import mosaic as attention_mosaic
  sm80, sm90 = llama_mosaic_rows
  assert sm80.target == "sm80" and sm80.status == "not applicable: Hopper-only"
  assert sm80.problems == [] and sm80.payload is None
  assert sm90.status == "ok" and sm90.kernel == "attention_fwd_mosaic"
  k = sm90.payload
  assert k.arch == (9, 0) and k.warpgroups == 3 and k.cluster == (1, 1, 1)
  assert k.wgmma > 0 and k.tma_loads > 0 and k.tma_stores > 0 and k.mbarrier > 0
  assert k.max_registers == (232, 40)  # consumers up, producer down (setmaxnreg)
  # The launch's SMEM is what attention.mosaic estimates (within alignment padding).
  estimate = attention_mosaic.shared_memory_bytes(attention_mosaic.heuristic(128), 128,
                                                  jnp.bfloat16)
  assert k.smem_source == mosaic.SMEM_SOURCE and abs(k.smem_bytes - estimate) <= 1024
  table = report.mosaic_table(llama_mosaic_rows)
  assert "n/a offline" in table and "not applicable: Hopper-only" in table
  assert not report.failed(llama_mosaic_rows)


@needs_mosaic_attention
def test_mosaic_thresholds(llama_mosaic_rows):
  good = llama_mosaic_rows[1]

  def row(wgmma_expected=True, **payload):
    return report.finish_mosaic(report.MosaicRow(
        "attention", "case", "k", "sm90", dataclasses.replace(good.payload, **payload),
        wgmma_expected=wgmma_expected))
  assert row().problems == []
  assert "no wgmma in the payload" in row(wgmma=0).status
  assert row(wgmma_expected=False, wgmma=0).problems == []   # e.g. a norm kernel
  assert "shared memory 228 KB > 227 KB per block on sm_90" in row(smem_bytes=228 * 1024).status
  assert "lowered for sm_100, not sm_90" in row(arch=(10, 0)).status
  error = report.finish_mosaic(report.MosaicRow("op", "case", "-", "sm90", error="boom"))
  assert error.status == "ERROR" and report.failed([error])


@needs_mosaic_attention
def test_exit_status_fails_on_a_mosaic_kernel_without_wgmma(monkeypatch, llama_mosaic_case,
                                                           tmp_path, capsys):
  # The real lowering, a payload reading that finds no wgmma: the row and the audit fail.
  analyze = mosaic.analyze
  monkeypatch.setattr(mosaic, "analyze", lambda b: dataclasses.replace(analyze(b), wgmma=0))
  monkeypatch.setattr(registry, "audit_cases", lambda *a, **k: [])
  monkeypatch.setattr(registry, "mosaic_cases", lambda *a, **k: [llama_mosaic_case])
  out = tmp_path / "rows.json"
  assert cli.main(["--target", "sm90", "--jobs", "1", "--json", str(out)]) == 1
  [row] = json.loads(out.read_text())["mosaic_rows"]
  assert row["payload"]["wgmma"] == 0 and row["status"].startswith("FAIL: no wgmma")
  assert row["registers"].startswith("n/a offline")
  captured = capsys.readouterr()
  assert "attention_fwd_mosaic" in captured.out and "FAIL attention" in captured.err


def test_a_mosaic_case_without_a_mosaic_kernel_fails():
  # An implementation registered as "mosaic" whose lowering holds no mosaic_gpu_v2 call.
  x = jnp.zeros((1024,), jnp.float32)
  case = registry.MosaicCase("toy", Case(op="toy", label="triton inside", make_inputs=lambda k: (
      x,), audit=True), toy_elementwise, hopper_only=True, wgmma_expected=False)
  [row] = run.mosaic_audit([case], [SM90], progress=lambda msg: None)
  assert row.status == "ERROR" and "no mosaic_gpu_v2 custom call" in row.problems[0]
  # A gradient may legitimately have none (a dead Mosaic forward, a Triton backward).
  [row] = run.mosaic_audit([dataclasses.replace(case, grad=True)], [SM90],
                           progress=lambda msg: None)
  assert row.problems == [] and row.status.startswith("not applicable: the gradient lowers")
