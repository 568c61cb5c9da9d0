"""`python -m engine generate` over the tiny engine (injected; the real model is the slow test)."""

import json

from engine import cli

FLAGS = ["--compile-cache", "", "--max-tokens", "8"]


def test_generate_prints_text_then_timings(llm, capsys):
  assert cli.main(["generate", "--prompt", "hello", *FLAGS], llm=llm) == 0
  out, err = capsys.readouterr()
  want = llm.generate("hello", cli_params())[0].text
  assert out == want + "\n"
  assert "time to first token" in err and "tokens/s" in err


def cli_params():
  from engine import SamplingParams
  return SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.1)


def test_stream_prints_the_same_text(llm, capsys):
  assert cli.main(["generate", "--prompt", "hello", "--stream", *FLAGS], llm=llm) == 0
  assert capsys.readouterr().out == llm.generate("hello", cli_params())[0].text + "\n"


def test_chat_flag_applies_the_template(llm, capsys):
  assert cli.main(["generate", "--prompt", "hi", "--chat", *FLAGS], llm=llm) == 0
  ids = llm.chat_prompt([{"role": "user", "content": "hi"}])
  assert capsys.readouterr().out == llm.generate(ids, cli_params())[0].text + "\n"


def test_jsonl_in_and_out(llm, tmp_path, capsys):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("\n".join([json.dumps("plain string"), json.dumps({"prompt": "abc",
                                                                     "max_tokens": 3}),
                            json.dumps({"messages": [{"role": "user", "content": "yo"}]}),
                            json.dumps({"prompt": ""})]) + "\n")
  assert cli.main(["generate", "--input", str(src), "--output", str(dst), *FLAGS], llm=llm) == 1
  rows = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [r["index"] for r in rows] == [0, 1, 2, 3]
  assert len(rows[1]["token_ids"]) == 3 and rows[0]["finish_reason"] in ("stop", "length")
  assert rows[3]["finish_reason"] == "error" and "`prompt`" in rows[3]["error"]
  assert rows[0]["metrics"]["time_to_first_token_s"] > 0
  assert "4 requests (1 errors)" in capsys.readouterr().err


def test_bad_flags_are_reported(llm, capsys):
  assert cli.main(["generate", "--prompt", "x", "--temperature", "-1", *FLAGS], llm=llm) == 2
  assert "`temperature`" in capsys.readouterr().err
