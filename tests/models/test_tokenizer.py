"""The tokenizer against the fixture of tests/fixtures/make_hf_fixtures.py: llama.cpp semantics
for SmolLM2's "smollm" pre-tokenizer (digits isolated), transformers for prompts and templates."""

import json

import gguf
import numpy as np
import pytest

from models.tokenizer import Tokenizer


def test_ids_match_llama_cpp_semantics(smollm2_tokenizer, smollm2_fixture):
  differs = []
  for case in smollm2_fixture["tokenizer"]:
    ids = smollm2_tokenizer.encode(case["text"])
    assert ids == case["llama_cpp"], case["text"]
    assert smollm2_tokenizer.decode(ids) == case["text"]
    if case["hf_gguf"] != case["llama_cpp"]:
      differs.append(case["text"])
  # transformers' GGUF tokenizer skips the digit split; the fixture keeps such cases.
  assert "   42" in differs


def test_prompts_and_chat_template_match_transformers(smollm2_tokenizer, smollm2_fixture):
  for prompt in smollm2_fixture["prompts"]:
    if "messages" in prompt:
      ids = smollm2_tokenizer.apply_chat_template(prompt["messages"])
    else:
      ids = smollm2_tokenizer.encode(prompt["text"])
    assert ids == prompt["ids"], prompt["name"]
  for case in smollm2_fixture["chat_templates"]:
    assert smollm2_tokenizer.apply_chat_template(case["messages"], tokenize=False) == case["text"]


def test_special_tokens(smollm2_tokenizer):
  tok = smollm2_tokenizer
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
  ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
  assert tok.vocab_size == 49152


def test_from_tokenizer_json_round_trip(tmp_path, smollm2_tokenizer, smollm2_fixture):
  smollm2_tokenizer.hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": smollm2_tokenizer.chat_template,
      "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}))
  tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  for case in smollm2_fixture["tokenizer"]:
    assert tok.encode(case["text"]) == case["llama_cpp"]
  chat = smollm2_fixture["chat_templates"][1]
  assert tok.apply_chat_template(chat["messages"], tokenize=False) == chat["text"]
  with pytest.raises(FileNotFoundError):
    Tokenizer.from_tokenizer_json(tmp_path / "missing.json")


def _vocab_gguf(path, pre, model="gpt2", add_bos=False):
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(["a", "b", "ab", "<s>"])
  w.add_token_types([1, 1, 1, 3])
  w.add_token_merges(["a b"])
  w.add_bos_token_id(3)
  w.add_add_bos_token(add_bos)
  w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
  w.add_tensor("x", np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_add_bos_token(tmp_path):
  tok = Tokenizer.from_gguf(_vocab_gguf(tmp_path / "bos.gguf", "llama-bpe", add_bos=True))
  assert tok.encode("abab") == [3, 2, 2]
  assert tok.encode("abab", add_special_tokens=False) == [2, 2]
  # The template writes its own BOS; tokenizing the rendered text must not add another.
  assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == [3, 2]


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
  assert Tokenizer.from_gguf(_vocab_gguf(tmp_path / "ok.gguf", "qwen2")).encode("abab") == [2, 2]
  with pytest.raises(ValueError, match="tokenizer.ggml.pre = 'mystery' is not supported"):
    Tokenizer.from_gguf(_vocab_gguf(tmp_path / "pre.gguf", "mystery"))
  with pytest.raises(ValueError, match="tokenizer.ggml.model = 'llama' is not supported"):
    Tokenizer.from_gguf(_vocab_gguf(tmp_path / "spm.gguf", "default", model="llama"))
