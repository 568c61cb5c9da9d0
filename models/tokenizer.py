"""Tokenizers: byte-level BPE from GGUF metadata, or a Hugging Face tokenizer.json; chat templates.

From GGUF we rebuild what llama.cpp runs for `tokenizer.ggml.model = "gpt2"`: a byte-level BPE over
the file's tokens and merges, split first by the pre-tokenizer regexes that `tokenizer.ggml.pre`
names (llama.cpp's `llama-vocab.cpp`), with control and user-defined tokens matched whole as added
tokens. SmolLM2 ("smollm") isolates every digit before the GPT-2 split, as its original
tokenizer.json does (Digits(individual_digits=True), then ByteLevel); transformers' GGUF
conversion drops the Digits step, so it is not the reference for digits after runs of spaces.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's pre-tokenizer regexes, by `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
           r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
          r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": (_GPT2,),
    "default": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # digits one by one, then GPT-2's split
    "starcoder": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}
# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(regexes: Sequence[str]):
  splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
  # The byte-level mapping itself, with the splitting already done above.
  return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                     use_regex=False)])


class Tokenizer:
  """encode/decode plus the model's chat template. Build with `from_gguf` or
  `from_tokenizer_json`."""

  def __init__(self, tokenizer: HFTokenizer, *, bos_token: str | None, eos_token: str | None,
               chat_template: str | None):
    self.hf = tokenizer
    self.bos_token = bos_token
    self.eos_token = eos_token
    self.chat_template = chat_template
    self.bos_token_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
    self.eos_token_id = None if eos_token is None else tokenizer.token_to_id(eos_token)

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Special tokens written in `text` (e.g. <|im_start|>) become their ids;
    `add_special_tokens` adds what the model prepends itself (a BOS for Llama 3, none for
    SmolLM2)."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode: `text` expected a str, got {type(text).__name__}")
    return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                          tokenize: bool = True, **kwargs) -> list[int] | str:
    """Render `messages` ([{"role": ..., "content": ...}]) with the model's Jinja template, as
    transformers does; ids (tokenized without adding a BOS: templates write their own) or text."""
    if not self.chat_template:
      raise ValueError("Tokenizer.apply_chat_template: this tokenizer has no chat template")
    text = _compile(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
    return self.encode(text, add_special_tokens=False) if tokenize else text

  # -- constructors -----------------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, gguf_file) -> Tokenizer:
    """From a `models.gguf.GGUFFile` (or a path) with tokenizer.ggml.model = "gpt2"."""
    from models.gguf import GGUFFile

    f = gguf_file if isinstance(gguf_file, GGUFFile) else GGUFFile(gguf_file)
    kind = f.metadata("tokenizer.ggml.model", None)
    if kind != "gpt2":
      raise ValueError(f"GGUF {f.path.name!r}: tokenizer.ggml.model = {kind!r} is not "
                       f"supported; only 'gpt2' (byte-level BPE) is")
    pre = f.metadata("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
      raise ValueError(f"GGUF {f.path.name!r}: tokenizer.ggml.pre = {pre!r} is not supported; "
                       f"supported: {', '.join(PRE_TOKENIZERS)}")
    tokens = f.metadata("tokenizer.ggml.tokens")
    types = f.metadata("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in f.metadata("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their vocab ids; control tokens are "special" (skippable in decode).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
      i = f.metadata(key, None)
      return None if i is None else tokens[int(i)]

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if f.metadata("tokenizer.ggml.add_bos_token", False) and bos is not None:
      tok.post_processor = processors.TemplateProcessing(
          single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
          special_tokens=[(bos, vocab[bos])])
    return cls(tok, bos_token=bos, eos_token=eos,
               chat_template=f.metadata("tokenizer.chat_template", None))

  @classmethod
  def from_tokenizer_json(cls, path: str | os.PathLike,
                          tokenizer_config_path: str | os.PathLike | None = None) -> Tokenizer:
    """A Hugging Face tokenizer.json; bos/eos tokens and the chat template from
    tokenizer_config.json (default: the one beside tokenizer.json, if any)."""
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer.json not found: {str(path)!r}")
    tok = HFTokenizer.from_file(str(path))
    config_path = (Path(tokenizer_config_path) if tokenizer_config_path is not None
                   else path.with_name("tokenizer_config.json"))
    config = {}
    if config_path.is_file():
      config = json.loads(config_path.read_text(encoding="utf-8"))
    elif tokenizer_config_path is not None:
      raise FileNotFoundError(f"tokenizer_config.json not found: {str(config_path)!r}")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default")
    if template is None and path.with_name("chat_template.jinja").is_file():
      template = path.with_name("chat_template.jinja").read_text(encoding="utf-8")
    return cls(tok, bos_token=_token_text(config.get("bos_token")),
               eos_token=_token_text(config.get("eos_token")), chat_template=template)


def _token_text(token) -> str | None:
  if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
    return token.get("content")
  return token


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
  # transformers' settings: sandboxed, trim_blocks/lstrip_blocks, loop controls, and the helpers
  # templates call (raise_exception, strftime_now, tojson that keeps non-ASCII).
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii, **kw)
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)
