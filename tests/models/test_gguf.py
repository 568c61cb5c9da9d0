"""GGUF: each dequantizer against blocks packed here from the GGML layout (ggml-common.h and
ggml-quants.c's dequantize_row_*), llama.cpp's Q/K permutation, our header parser against
gguf.GGUFReader, a tiny model written with gguf.GGUFWriter and loaded back, and the errors."""

import struct

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import gguf as G
from models.llama import Llama
from tests.models.conftest import TINY, random_llama

QT = gguf.GGMLQuantizationType
RNG = np.random.default_rng(0)


def _f16_bytes(x) -> bytes:
  return struct.pack("<e", x)


def _f16(x) -> float:  # the value a scale takes once stored as fp16
  return float(np.float16(x))


# -- block packers, written element by element from the C layouts -----------------------------

def pack_q8_0(n_blocks):
  """block_q8_0 {half d; int8 qs[32]}: x[i] = d * qs[i]."""
  raw, want = b"", []
  for _ in range(n_blocks):
    d, q = _f16(RNG.uniform(0.001, 0.1)), RNG.integers(-128, 128, 32)
    raw += _f16_bytes(d) + struct.pack("<32b", *q)
    want += [d * v for v in q]
  return raw, want


def pack_q4_0(n_blocks):
  """block_q4_0 {half d; uint8 qs[16]}: x[j] = d * ((qs[j] & 15) - 8),
  x[j + 16] = d * ((qs[j] >> 4) - 8)."""
  raw, want = b"", []
  for _ in range(n_blocks):
    d, q = _f16(RNG.uniform(0.001, 0.1)), RNG.integers(0, 16, 32)
    raw += _f16_bytes(d) + bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
    want += [d * (v - 8) for v in q]
  return raw, want


def pack_q4_1(n_blocks):
  """block_q4_1 {half d; half m; uint8 qs[16]}: x[j] = d * (qs[j] & 15) + m, x[j + 16] from >> 4."""
  raw, want = b"", []
  for _ in range(n_blocks):
    d, m, q = _f16(RNG.uniform(0.001, 0.1)), _f16(RNG.uniform(-1, 1)), RNG.integers(0, 16, 32)
    raw += _f16_bytes(d) + _f16_bytes(m) + bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
    want += [d * v + m for v in q]
  return raw, want


def pack_q4_k(n_blocks):
  """block_q4_K {half d; half dmin; uint8 scales[12]; uint8 qs[128]}: 8 sub-blocks of 32 with
  6-bit scale sc and min mn (get_scale_min_k4); qs[32 c + l] holds element 64 c + l in its low
  nibble and 64 c + 32 + l in its high one; x = d * sc[sub] * q - dmin * mn[sub]."""
  raw, want = b"", []
  for _ in range(n_blocks):
    d, dmin = _f16(RNG.uniform(0.001, 0.01)), _f16(RNG.uniform(0.001, 0.01))
    sc, mn, q = RNG.integers(0, 64, 8), RNG.integers(0, 64, 8), RNG.integers(0, 16, 256)
    scales = [0] * 12
    for j in range(4):
      scales[j] = int(sc[j]) | (int(sc[j + 4]) >> 4) << 6
      scales[j + 4] = int(mn[j]) | (int(mn[j + 4]) >> 4) << 6
      scales[j + 8] = (int(sc[j + 4]) & 15) | (int(mn[j + 4]) & 15) << 4
    qs = [int(q[64 * c + l]) | int(q[64 * c + 32 + l]) << 4 for c in range(4) for l in range(32)]
    raw += _f16_bytes(d) + _f16_bytes(dmin) + bytes(scales) + bytes(qs)
    want += [d * sc[e // 32] * q[e] - dmin * mn[e // 32] for e in range(256)]
  return raw, want


def pack_q6_k(n_blocks):
  """block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}, dequantize_row_q6_K:
  per half h (128 elements) and l < 32, the 6-bit codes u1..u4 of elements l, l+32, l+64, l+96 are
  ql[l] = u1 & 15 | (u3 & 15) << 4, ql[l+32] = u2 & 15 | (u4 & 15) << 4,
  qh[l] = u1 >> 4 | (u2 >> 4) << 2 | (u3 >> 4) << 4 | (u4 >> 4) << 6;
  x = d * scales[e / 16] * (u - 32)."""
  raw, want = b"", []
  for _ in range(n_blocks):
    d = _f16(RNG.uniform(0.001, 0.01))
    scales, u = RNG.integers(-128, 128, 16), RNG.integers(0, 64, 256)
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
      for l in range(32):
        u1, u2, u3, u4 = (int(u[128 * h + 32 * j + l]) for j in range(4))
        ql[64 * h + l] = (u1 & 15) | (u3 & 15) << 4
        ql[64 * h + 32 + l] = (u2 & 15) | (u4 & 15) << 4
        qh[32 * h + l] = u1 >> 4 | (u2 >> 4) << 2 | (u3 >> 4) << 4 | (u4 >> 4) << 6
    raw += bytes(ql) + bytes(qh) + struct.pack("<16b", *scales) + _f16_bytes(d)
    want += [d * scales[e // 16] * (u[e] - 32) for e in range(256)]
  return raw, want


PACKERS = {QT.Q8_0: pack_q8_0, QT.Q4_0: pack_q4_0, QT.Q4_1: pack_q4_1, QT.Q4_K: pack_q4_k,
           QT.Q6_K: pack_q6_k}


@pytest.mark.parametrize("qtype", list(PACKERS), ids=lambda t: t.name)
def test_dequantize_against_packed_blocks(qtype):
  block_size = G.BLOCKS[qtype][0]
  raw, want = PACKERS[qtype](6)
  data = np.frombuffer(raw, np.uint8).reshape(3, -1)  # 3 rows of 2 blocks, as GGUF stores them
  got = G.dequantize(data, qtype, (3, 2 * block_size))
  assert got.dtype == np.float32 and got.shape == (3, 2 * block_size)
  np.testing.assert_allclose(got.reshape(-1), np.asarray(want, np.float64), rtol=1e-6, atol=1e-7)
  bf16 = G.dequantize(data, qtype, (3, 2 * block_size), dtype=jnp.bfloat16)
  np.testing.assert_array_equal(bf16, got.astype(jnp.bfloat16))


@pytest.mark.parametrize("qtype", list(PACKERS), ids=lambda t: t.name)
def test_dequantize_agrees_with_gguf_package(qtype, monkeypatch):
  """Random bytes (finite fp16 scales) across several of our slices, against gguf.quants."""
  monkeypatch.setattr(G, "_BLOCKS_PER_SLICE", 7)
  block_size, block_bytes = G.BLOCKS[qtype]
  raw, _ = PACKERS[qtype](1)  # a valid block, to locate the fp16 fields in random ones
  blocks = RNG.integers(0, 256, (20, block_bytes), dtype=np.uint8)
  for start in {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q4_K: [0, 2],
                QT.Q6_K: [208]}[qtype]:
    blocks[:, start:start + 2] = np.frombuffer(
        RNG.uniform(-0.1, 0.1, 20).astype(np.float16).tobytes(), np.uint8).reshape(20, 2)
  ours = G.dequantize(blocks, qtype, (20 * block_size,))
  theirs = gguf.quants.dequantize(blocks, qtype).reshape(-1)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_float_types():
  x = RNG.normal(size=(4, 8)).astype(np.float32)
  np.testing.assert_array_equal(G.dequantize(x.view(np.uint8), QT.F32, (4, 8)), x)
  np.testing.assert_array_equal(G.dequantize(x.astype(np.float16).view(np.uint8), QT.F16, (4, 8)),
                                x.astype(np.float16).astype(np.float32))
  bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exactly representable
  np.testing.assert_array_equal(G.dequantize(bf16.view(np.uint8), QT.BF16, (4, 8)),
                                (bf16.astype(np.uint32) << 16).view(np.float32))


def test_unsupported_type_is_refused_by_name():
  with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has type Q5_K"):
    G.dequantize(np.zeros(176, np.uint8), QT.Q5_K, (256,), name="blk.0.attn_q.weight")


def llama_cpp_permute(w, n_head, n_head_kv=None):
  """convert_hf_to_gguf.py, LlamaModel.permute."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
  heads, head_dim = 3, 8
  w = RNG.normal(size=(heads * head_dim, 5))
  permuted = llama_cpp_permute(w, 9, heads)  # K of a model with 9 query heads, 3 KV heads
  np.testing.assert_array_equal(G.unpermute_qk(permuted, heads), w)
  # What the permutation does: HF's rotate_half pair (i, i + d/2) becomes rows (2i, 2i + 1).
  np.testing.assert_array_equal(permuted[head_dim + 2], w[head_dim + 1])
  np.testing.assert_array_equal(permuted[head_dim + 3], w[head_dim + head_dim // 2 + 1])
  bias = RNG.normal(size=heads * head_dim)
  np.testing.assert_array_equal(G.unpermute_qk(llama_cpp_permute(bias, heads), heads), bias)


# -- whole files --------------------------------------------------------------------------------

def _hf_layout(model: Llama) -> dict[str, np.ndarray]:
  """The model's weights under llama.cpp names, [out, in], Q/K permuted as llama.cpp writes."""
  c = model.config
  q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  out = {"token_embd.weight": np.asarray(model.embed[...]),
         "output_norm.weight": np.asarray(model.final_norm[...])}
  if model.lm_head is not None:
    out["output.weight"] = np.asarray(model.lm_head[...]).T
  for i, layer in enumerate(model.layers):
    p = f"blk.{i}."
    wqkv = np.asarray(layer.attn.wqkv[...]).T
    out[p + "attn_q.weight"] = llama_cpp_permute(wqkv[:q_rows], c.num_heads)
    out[p + "attn_k.weight"] = llama_cpp_permute(wqkv[q_rows:q_rows + kv_rows], c.num_heads,
                                                 c.num_kv_heads)
    out[p + "attn_v.weight"] = wqkv[q_rows + kv_rows:]
    out[p + "attn_output.weight"] = np.asarray(layer.attn.wo[...]).T
    out[p + "attn_norm.weight"] = np.asarray(layer.attn_norm[...])
    out[p + "ffn_norm.weight"] = np.asarray(layer.mlp_norm[...])
    for ours, theirs in (("w_gate", "ffn_gate"), ("w_up", "ffn_up"), ("w_down", "ffn_down")):
      out[p + theirs + ".weight"] = np.asarray(getattr(layer.mlp, ours)[...]).T
  return out


def write_gguf(path, model: Llama, *, arch="llama", quantize=None, drop=(), replace=None):
  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_heads)
  w.add_head_count_kv(c.num_kv_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_theta)
  w.add_rope_dimension_count(c.head_dim)
  w.add_array("test.strings", ["a", "ü", "<|im_start|>"])
  for name, array in {**_hf_layout(model), **(replace or {})}.items():
    if name in drop:
      continue
    if name in (quantize or {}):  # {name: type}
      w.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), quantize[name]),
                   raw_dtype=quantize[name])
    else:
      w.add_tensor(name, np.ascontiguousarray(array, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  model = random_llama(TINY.replace(tie_word_embeddings=False))
  path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model,
                    quantize={"blk.1.ffn_up.weight": QT.Q8_0})
  return model, path


def test_header_parser_agrees_with_gguf_reader(tiny_gguf):
  _, path = tiny_gguf
  ours, reader = G.GGUFFile(path), gguf.GGUFReader(path)
  assert set(ours.fields) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count",
                                                    "GGUF.kv_count"}
  for key, field in reader.fields.items():
    if key in ours.fields:
      assert ours.fields[key] == pytest.approx(field.contents()), key
  assert [t.name for t in reader.tensors] == list(ours.tensors)
  for t in reader.tensors:
    info = ours.tensors[t.name]
    assert info.qtype == t.tensor_type and info.shape == tuple(reversed(t.shape.tolist()))
    np.testing.assert_array_equal(info.data, np.asarray(t.data).view(np.uint8).reshape(-1))


def test_tiny_gguf_loads_to_the_same_model(tiny_gguf):
  model, path = tiny_gguf
  f = G.GGUFFile(path)
  loaded = G.load_llama(f)
  assert loaded.config == model.config.replace(
      rms_norm_eps=float(np.float32(model.config.rms_norm_eps)))
  # The Q8_0 tensor comes back as its dequantization; everything else exactly.
  up = f.tensor("blk.1.ffn_up.weight").T
  assert 0 < np.abs(up - np.asarray(model.layers[1].mlp.w_up[...])).max() < 0.01
  model.layers[1].mlp.w_up.set_value(jnp.asarray(up))
  want, got = nnx.state(model, nnx.Param), nnx.state(loaded, nnx.Param)
  for (path_a, a), (path_b, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
    assert path_a == path_b
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path_a))


def test_load_errors_name_the_problem(tmp_path, tiny_gguf):
  model, _ = tiny_gguf
  with pytest.raises(ValueError, match="general.architecture = 'gpt2' is not supported"):
    G.load_llama(write_gguf(tmp_path / "a.gguf", model, arch="gpt2"))
  bad = np.zeros((7, TINY.hidden_size), np.float32)
  with pytest.raises(ValueError, match=r"'blk.0.attn_k.weight': expected shape \(32, 64\), "
                                       r"got \(7, 64\)"):
    G.load_llama(write_gguf(tmp_path / "b.gguf", model, replace={"blk.0.attn_k.weight": bad}))
  with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' has type Q5_0, which is not"):
    G.load_llama(write_gguf(tmp_path / "q5.gguf", model, quantize={"blk.0.ffn_up.weight": QT.Q5_0}))
  with pytest.raises(ValueError, match="has no tensor 'blk.1.ffn_down.weight'"):
    G.load_llama(write_gguf(tmp_path / "c.gguf", model, drop={"blk.1.ffn_down.weight"}))
  (tmp_path / "d.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    G.GGUFFile(tmp_path / "d.gguf")
  with pytest.raises(FileNotFoundError):
    G.GGUFFile(tmp_path / "missing.gguf")
