"""GGUF files: memory-mapped reading, dequantization, llama.cpp names and metadata -> `Llama`.

The file is a read-only memory map: nothing but the header is read until a tensor is
dequantized, and a tensor's pages are dropped again once it is converted. Dequantization is our
own vectorised numpy, written from the GGML block layouts (ggml-common.h), and runs tensor by
tensor, in slices of blocks, into one preallocated array of the model's dtype, so loading never
holds more than one tensor's copy beside the model.

Layout facts used below: GGUF lists a tensor's dims innermost first (`ne`), so a 2-D tensor with
ne = [in, out] is the row-major numpy array [out, in], the same orientation as a PyTorch Linear
weight. llama.cpp's converter permutes the rows of Llama's Q and K projections (within each head,
the two rotate_half halves interleaved) to suit its RoPE; `unpermute_qk` undoes it.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from models.llama import Llama, LlamaConfig
from models.rope import RopeScaling, inverse_frequencies

QT = GGMLQuantizationType
GT = GGUFValueType
QK_K = 256
# type -> (elements per block, bytes per block)
BLOCKS = {
    QT.Q8_0: (32, 34),
    QT.Q4_0: (32, 18),
    QT.Q4_1: (32, 20),
    QT.Q4_K: (QK_K, 144),
    QT.Q6_K: (QK_K, 210),
}
SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16) + tuple(BLOCKS)
ARCHITECTURES = ("llama", "qwen2")
_BLOCKS_PER_SLICE = 1 << 15  # bounds the float32 temporaries of one dequantization slice


# -- dequantization ---------------------------------------------------------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
  """[n, 2] uint8 -> [n, 1] float32 (a little-endian fp16 per row)."""
  return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


# Each dequantizer takes `blocks` uint8 [n, block_bytes] and writes float32 `out` [n, block_size]:
# the integer codes are assembled in (u)int8 and converted by the one multiply that scales them,
# which halves the time of a float32 round trip per step on this CPU.

def _q8_0(b: np.ndarray, out: np.ndarray):
  # block: d fp16 | qs int8[32]; x = d * q
  np.multiply(b[:, 2:].view(np.int8), _f16(b[:, :2]), out=out)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """[n, 16] bytes -> [n, 32] uint8: low nibbles are elements 0..15, high nibbles 16..31."""
  codes = np.empty((qs.shape[0], 32), np.uint8)
  np.bitwise_and(qs, 0x0F, out=codes[:, :16])
  np.right_shift(qs, 4, out=codes[:, 16:])
  return codes


def _q4_0(b: np.ndarray, out: np.ndarray):
  # block: d fp16 | qs uint8[16]; x = d * (q - 8)
  codes = _nibbles(b[:, 2:])
  codes -= 8  # wraps in uint8; read back as int8 it is q - 8 in [-8, 7]
  np.multiply(codes.view(np.int8), _f16(b[:, :2]), out=out)


def _q4_1(b: np.ndarray, out: np.ndarray):
  # block: d fp16 | m fp16 | qs uint8[16]; x = d * q + m
  np.multiply(_nibbles(b[:, 4:]), _f16(b[:, :2]), out=out)
  out += _f16(b[:, 2:4])


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_K/Q5_K: 12 bytes -> 8 six-bit (scale, min) pairs, as ggml's get_scale_min_k4:
  j < 4: scale = s[j] & 63, min = s[j+4] & 63;
  j >= 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4, min = (s[j+4] >> 4) | (s[j] >> 6) << 4."""
  s = scales.astype(np.uint8)
  lo_scale, lo_min, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
  scale = np.concatenate([lo_scale & 63, (hi & 15) | ((lo_scale >> 6) << 4)], axis=1)
  minimum = np.concatenate([lo_min & 63, (hi >> 4) | ((lo_min >> 6) << 4)], axis=1)
  return scale, minimum


def _q4_k(b: np.ndarray, out: np.ndarray):
  # block: d fp16 | dmin fp16 | scales[12] | qs[128]; 8 sub-blocks of 32:
  # qs[32 j: 32 j + 32] holds sub-block 2j in its low nibbles and 2j + 1 in its high nibbles.
  # x = d * scale[sub] * q - dmin * min[sub]
  n = b.shape[0]
  scale, minimum = k_scale_min(b[:, 4:16])
  qs = b[:, 16:144].reshape(n, 4, 32)
  codes = np.empty((n, 4, 2, 32), np.uint8)
  np.bitwise_and(qs, 0x0F, out=codes[:, :, 0])
  np.right_shift(qs, 4, out=codes[:, :, 1])
  out3 = out.reshape(n, 8, 32)
  np.multiply(codes.reshape(n, 8, 32), (_f16(b[:, 0:2]) * scale)[:, :, None], out=out3)
  out3 -= (_f16(b[:, 2:4]) * minimum)[:, :, None]


_Q6_SHIFTS = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]


def _q6_k(b: np.ndarray, out: np.ndarray):
  # block: ql[128] | qh[64] | scales int8[16] | d fp16. Two halves of 128 elements; in half h,
  # element 32 j + l (j = 0..3, l = 0..31) has low 4 bits from ql[64 h + 32 (j % 2) + l]
  # (low nibble for j < 2, high for j >= 2) and high 2 bits from qh[32 h + l] >> 2 j.
  # x = d * scales[e // 16] * (q - 32), e the element index in the block.
  n = b.shape[0]
  ql = b[:, 0:128].reshape(n, 2, 2, 32)
  codes = np.empty((n, 2, 2, 2, 32), np.uint8)  # [half, nibble, ql part, l]: j = 2 nibble + part
  np.bitwise_and(ql, 0x0F, out=codes[:, :, 0])
  np.right_shift(ql, 4, out=codes[:, :, 1])
  codes = codes.reshape(n, 2, 4, 32)
  codes |= ((b[:, 128:192].reshape(n, 2, 1, 32) >> _Q6_SHIFTS) & 3) << 4
  codes -= 32  # wraps in uint8; read back as int8 it is q - 32 in [-32, 31]
  scales = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8)
  np.multiply(codes.reshape(n, 16, 16).view(np.int8), scales[:, :, None],
              out=out.reshape(n, 16, 16))


_DEQUANT = {QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q4_K: _q4_k, QT.Q6_K: _q6_k}


def dequantize(data: np.ndarray, qtype, shape: tuple[int, ...], *, name: str = "tensor",
               dtype=np.float32) -> np.ndarray:
  """Raw GGUF tensor data -> array of `shape` (numpy order, outermost first) and `dtype`
  (computed in float32, rounded slice by slice, so a bfloat16 result never exists in float32)."""
  qtype = QT(qtype)
  dtype = np.dtype(dtype)
  count = int(np.prod(shape))
  raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
  if qtype == QT.F32:
    values = raw.view(np.float32)  # a view of the map when dtype is float32: the caller copies
    return values.reshape(shape) if dtype == np.float32 else values.astype(dtype).reshape(shape)
  if qtype == QT.F16:
    return raw.view(np.float16).astype(dtype).reshape(shape)
  if qtype == QT.BF16:
    values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(dtype, copy=False).reshape(shape)
  if qtype not in _DEQUANT:
    raise ValueError(f"GGUF tensor {name!r} has type {qtype.name}, which is not supported; "
                     f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")
  block_size, block_bytes = BLOCKS[qtype]
  if count % block_size:
    raise ValueError(f"GGUF tensor {name!r} ({qtype.name}) has {count} elements, not a multiple "
                     f"of its block size {block_size}")
  if raw.size != count // block_size * block_bytes:
    raise ValueError(f"GGUF tensor {name!r} ({qtype.name}): expected "
                     f"{count // block_size * block_bytes} bytes for shape {tuple(shape)}, "
                     f"got {raw.size}")
  blocks = raw.reshape(-1, block_bytes)
  out = np.empty((blocks.shape[0], block_size), dtype)
  scratch = None if dtype == np.float32 else np.empty((_BLOCKS_PER_SLICE, block_size), np.float32)
  for first in range(0, blocks.shape[0], _BLOCKS_PER_SLICE):
    last = min(first + _BLOCKS_PER_SLICE, blocks.shape[0])
    if scratch is None:
      _DEQUANT[qtype](blocks[first:last], out[first:last])
    else:
      _DEQUANT[qtype](blocks[first:last], scratch[:last - first])
      out[first:last] = scratch[:last - first]
  return out.reshape(shape)


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (`convert_hf_to_gguf.LlamaModel.permute`, with
  num_heads = n_head for Q, n_head_kv for K). Rows are the output features: [out, in] or [out]."""
  rows = w.shape[0]
  head_dim = rows // num_heads
  return (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


# -- files ------------------------------------------------------------------------------------

_MISSING = object()
GGUF_MAGIC = b"GGUF"
_SCALARS = {  # GGUFValueType -> struct format (little-endian)
    GT.UINT8: "<B", GT.INT8: "<b", GT.UINT16: "<H", GT.INT16: "<h", GT.UINT32: "<I",
    GT.INT32: "<i", GT.FLOAT32: "<f", GT.BOOL: "<?", GT.UINT64: "<Q", GT.INT64: "<q",
    GT.FLOAT64: "<d"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  qtype: GGMLQuantizationType
  shape: tuple[int, ...]  # numpy order, outermost first (the reverse of GGUF's ne)
  data: np.ndarray  # uint8 view of the memory map: the tensor's raw bytes
  offset: int  # of `data` in the file


class _Cursor:
  """Sequential little-endian reads from the file's header (memory-mapped bytes)."""

  def __init__(self, buf, path: Path):
    self.buf, self.pos, self.path = buf, 0, path

  def scalar(self, fmt: str):
    value = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += struct.calcsize(fmt)
    return value

  def _need(self, size: int, what: str):
    if size > len(self.buf) - self.pos:
      raise ValueError(f"{what} of {size} bytes at offset {self.pos} runs past the end of the file")

  def string(self) -> str:
    size = self.scalar("<Q")
    self._need(size, "a string")
    raw = bytes(self.buf[self.pos:self.pos + size])
    self.pos += size
    return raw.decode("utf-8", errors="replace")

  def value(self, vtype: int):
    vtype = GT(vtype)
    if vtype == GT.STRING:
      return self.string()
    if vtype == GT.ARRAY:
      item_type, count = GT(self.scalar("<I")), self.scalar("<Q")
      self._need(count, "an array")  # every item takes at least a byte
      if item_type == GT.STRING:
        return [self.string() for _ in range(count)]
      if item_type == GT.ARRAY:
        return [self.value(GT.ARRAY) for _ in range(count)]
      dtype = np.dtype(_SCALARS[item_type][1:]).newbyteorder("<")
      items = np.frombuffer(self.buf, dtype, count, self.pos)
      self.pos += count * dtype.itemsize
      return items.tolist()
    return self.scalar(_SCALARS[vtype])


class GGUFFile:
  """A memory-mapped GGUF file: metadata by key, tensors dequantized on demand.

  The header is parsed here with `struct` rather than by `gguf.GGUFReader`, which walks every
  string of the vocabulary through numpy memmap slices (5-14 s for SmolLM2's 98k tokens and
  merges on this machine, against ~0.1 s here); tests check both agree. The `gguf` package still
  supplies the type tables.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {str(self.path)!r}")
    try:
      with open(self.path, "rb") as file:
        self._mmap = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
      self._map = np.frombuffer(self._mmap, np.uint8)
      self.fields, infos, data_start = self._parse_header()
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{str(self.path)!r} is not a readable GGUF file: {e}") from e
    self.tensors: dict[str, TensorInfo] = {}
    raw = self._map
    for name, ne, qtype, offset in infos:
      shape = tuple(reversed(ne))
      block_size, block_bytes = GGML_QUANT_SIZES[qtype]
      count = int(np.prod(shape, dtype=np.int64))
      nbytes = count // block_size * block_bytes
      start = data_start + offset
      if start + nbytes > raw.size:
        raise ValueError(f"GGUF tensor {name!r} runs past the end of {self.path.name!r}")
      self.tensors[name] = TensorInfo(name, qtype, shape, raw[start:start + nbytes], start)

  def _parse_header(self):
    c = _Cursor(memoryview(self._map), self.path)
    if bytes(self._map[:4]) != GGUF_MAGIC:
      raise ValueError(f"bad magic {bytes(self._map[:4])!r}, expected {GGUF_MAGIC!r}")
    c.pos = 4
    version = c.scalar("<I")
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version} (big-endian file?) is not supported; "
                       f"supported: 2, 3 little-endian")
    tensor_count, kv_count = c.scalar("<Q"), c.scalar("<Q")
    fields = {}
    for _ in range(kv_count):
      key = c.string()
      fields[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(tensor_count):
      name = c.string()
      n_dims = c.scalar("<I")
      if n_dims > 4:
        raise ValueError(f"tensor {name!r} has {n_dims} dimensions, GGML allows at most 4")
      ne = [c.scalar("<Q") for _ in range(n_dims)]
      qtype = c.scalar("<I")
      try:
        qtype = QT(qtype)
      except ValueError:
        raise ValueError(f"tensor {name!r} has unknown GGML type {qtype}") from None
      infos.append((name, ne, qtype, c.scalar("<Q")))
    alignment = int(fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-c.pos // alignment) * alignment
    return fields, infos, data_start

  def release(self, name: str) -> None:
    """Drop the file pages of a tensor already converted from this process's memory (they
    count in its RSS until then); reading it again just faults them back in."""
    t = self.tensors[name]
    first = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
    last = -(-(t.offset + t.data.size) // mmap.PAGESIZE) * mmap.PAGESIZE
    self._mmap.madvise(mmap.MADV_DONTNEED, first, min(last, len(self._mmap)) - first)

  def metadata(self, key: str, default=_MISSING):
    if key not in self.fields:
      if default is _MISSING:
        raise KeyError(f"GGUF file {self.path.name!r} has no metadata key {key!r}")
      return default
    return self.fields[key]

  def shape(self, name: str) -> tuple[int, ...]:
    """numpy order (outermost first): the reverse of GGUF's ne."""
    return self.tensors[name].shape

  def tensor(self, name: str, expected_shape: tuple[int, ...] | None = None, *,
             dtype=np.float32) -> np.ndarray:
    """Dequantized tensor (float32 unless `dtype`); `expected_shape` (numpy order) checked first."""
    if name not in self.tensors:
      raise ValueError(f"GGUF file {self.path.name!r} has no tensor {name!r}")
    t = self.tensors[name]
    if expected_shape is not None and t.shape != tuple(expected_shape):
      raise ValueError(f"GGUF tensor {name!r}: expected shape {tuple(expected_shape)}, "
                       f"got {t.shape}")
    return dequantize(t.data, t.qtype, t.shape, name=name, dtype=dtype)


# -- metadata -> config -----------------------------------------------------------------------

def config_from_gguf(f: GGUFFile) -> LlamaConfig:
  arch = f.metadata("general.architecture", None)
  if arch not in ARCHITECTURES:
    raise ValueError(f"GGUF {f.path.name!r}: general.architecture = {arch!r} is not supported "
                     f"by the Llama loader; supported: {', '.join(ARCHITECTURES)}")

  def meta(key, default=_MISSING):
    value = f.metadata(f"{arch}.{key}", default)
    if isinstance(value, list):
      raise ValueError(f"GGUF {f.path.name!r}: {arch}.{key} is a per-layer list; "
                       f"only a single value is supported")
    return value

  num_heads = int(meta("attention.head_count"))
  hidden = int(meta("embedding_length"))
  head_dim = int(meta("attention.key_length", hidden // num_heads))
  rope_dim = int(meta("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(f"GGUF {f.path.name!r}: {arch}.rope.dimension_count = {rope_dim} differs "
                     f"from head_dim {head_dim}; partial rotary embeddings are not supported")
  if "token_embd.weight" not in f.tensors:
    raise ValueError(f"GGUF file {f.path.name!r} has no tensor 'token_embd.weight'")
  theta = float(meta("rope.freq_base", 10000.0))
  return LlamaConfig(
      vocab_size=f.shape("token_embd.weight")[0], hidden_size=hidden,
      intermediate_size=int(meta("feed_forward_length")), num_layers=int(meta("block_count")),
      num_heads=num_heads, num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
      head_dim=head_dim, rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=theta, rope_scaling=_rope_scaling(f, arch, head_dim, theta),
      max_position_embeddings=int(meta("context_length", 4096)),
      tie_word_embeddings="output.weight" not in f.tensors,
      qkv_bias="blk.0.attn_q.bias" in f.tensors)


# Llama 3.x files carry their RoPE scaling only as the `rope_freqs.weight` divisors; these are the
# published parameter sets they are matched against (Llama 3.1, Llama 3.2).
_LLAMA3_SCALINGS = (RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                    RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> RopeScaling | None:
  kind = f.metadata(f"{arch}.rope.scaling.type", "none")
  if "rope_freqs.weight" in f.tensors:
    divisors = f.tensor("rope_freqs.weight", (head_dim // 2,))
    plain = inverse_frequencies(head_dim, theta)
    for candidate in _LLAMA3_SCALINGS:
      if np.allclose(plain / divisors, inverse_frequencies(head_dim, theta, candidate),
                     rtol=1e-4):
        return candidate
    raise ValueError(f"GGUF {f.path.name!r}: rope_freqs.weight matches no known Llama 3 RoPE "
                     f"scaling ({', '.join(f'factor={s.factor}' for s in _LLAMA3_SCALINGS)})")
  if kind in ("none", None):
    return None
  if kind == "linear":
    return RopeScaling("linear", factor=float(f.metadata(f"{arch}.rope.scaling.factor")))
  raise ValueError(f"GGUF {f.path.name!r}: {arch}.rope.scaling.type = {kind!r} is not "
                   f"supported; supported: 'none', 'linear', and Llama 3 rope_freqs")


# -- tensors -> model -------------------------------------------------------------------------

def _expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  c = config
  q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = {"token_embd.weight": (c.vocab_size, c.hidden_size),
            "output_norm.weight": (c.hidden_size,)}
  if not c.tie_word_embeddings:
    shapes["output.weight"] = (c.vocab_size, c.hidden_size)
  for i in range(c.num_layers):
    p = f"blk.{i}."
    shapes.update({
        p + "attn_norm.weight": (c.hidden_size,), p + "ffn_norm.weight": (c.hidden_size,),
        p + "attn_q.weight": (q_rows, c.hidden_size), p + "attn_k.weight": (kv_rows, c.hidden_size),
        p + "attn_v.weight": (kv_rows, c.hidden_size),
        p + "attn_output.weight": (c.hidden_size, q_rows),
        p + "ffn_gate.weight": (c.intermediate_size, c.hidden_size),
        p + "ffn_up.weight": (c.intermediate_size, c.hidden_size),
        p + "ffn_down.weight": (c.hidden_size, c.intermediate_size)})
    if c.qkv_bias:
      shapes.update({p + "attn_q.bias": (q_rows,), p + "attn_k.bias": (kv_rows,),
                     p + "attn_v.bias": (kv_rows,)})
  return shapes


def load_llama(path_or_file: str | os.PathLike | GGUFFile, *, dtype=None, impl=None,
               interpret: bool = False) -> Llama:
  """Build a `Llama` from a GGUF file, one tensor at a time (dtype default float32)."""
  import jax.numpy as jnp
  from flax import nnx

  f = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
  config = config_from_gguf(f)
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  expected = _expected_tensors(config)
  unknown = sorted(set(f.tensors) - set(expected) - {"rope_freqs.weight"})
  if unknown:
    raise ValueError(f"GGUF {f.path.name!r}: tensors the Llama loader does not know: "
                     f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
  # Llama files carry Q/K permuted for llama.cpp's RoPE; Qwen2 files are written unpermuted.
  permuted = f.metadata("general.architecture") == "llama"
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, impl=impl, interpret=interpret,
                                       rngs=nnx.Rngs(0)))

  def get(name):
    # Dequantized straight to the model's dtype; then the file pages can go (an F32 tensor is
    # a view of them: `put` faults its pages back in once, to copy them).
    array = f.tensor(name, expected[name], dtype=dtype)
    f.release(name)
    return array

  def put(param: nnx.Param, array: np.ndarray):
    param.set_value(jnp.asarray(array, dtype=dtype))

  put(model.embed, get("token_embd.weight"))
  put(model.final_norm, get("output_norm.weight"))
  if model.lm_head is not None:
    put(model.lm_head, get("output.weight").T)
  for i, layer in enumerate(model.layers):
    p = f"blk.{i}."
    q, k, v = get(p + "attn_q.weight"), get(p + "attn_k.weight"), get(p + "attn_v.weight")
    if permuted:
      q, k = unpermute_qk(q, config.num_heads), unpermute_qk(k, config.num_kv_heads)
    put(layer.attn.wqkv, np.concatenate([q, k, v], axis=0).T)
    del q, k, v
    if config.qkv_bias:
      qb, kb, vb = get(p + "attn_q.bias"), get(p + "attn_k.bias"), get(p + "attn_v.bias")
      if permuted:
        qb, kb = unpermute_qk(qb, config.num_heads), unpermute_qk(kb, config.num_kv_heads)
      put(layer.attn.bqkv, np.concatenate([qb, kb, vb]))
    put(layer.attn.wo, get(p + "attn_output.weight").T)
    put(layer.attn_norm, get(p + "attn_norm.weight"))
    put(layer.mlp_norm, get(p + "ffn_norm.weight"))
    put(layer.mlp.w_gate, get(p + "ffn_gate.weight").T)
    put(layer.mlp.w_up, get(p + "ffn_up.weight").T)
    put(layer.mlp.w_down, get(p + "ffn_down.weight").T)
  return model
