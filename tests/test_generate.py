"""`lmloop generate` and `lmloop chat` through the CLI, on a tiny Hugging Face Llama folder."""

from __future__ import annotations

import io
import json

import pytest
from modelkit import hf_llama, save_hf, tiny_tokenizer

from lmloop.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    d = tmp_path_factory.mktemp("hf-llama")
    save_hf(hf_llama(tok.vocab_size, tied=True), tok, d)
    return str(d)


def _json(capsys, *args) -> dict:
    assert main(["generate", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_streams_and_json_agree(model_dir, capsys):
    base = ["--model", model_dir, "--prompt", "Once upon a time", "--max-tokens", "8"]
    obj = _json(capsys, *base, "--temperature", "0", "--json")
    assert obj["completion_tokens"] <= 8 and obj["prompt_tokens"] > 0
    assert (
        obj["finish_reason"] in ("stop", "length")
        and len(obj["token_ids"]) == obj["completion_tokens"]
    )
    assert main(["generate", *base, "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == obj["text"] + "\n"
    assert "new tokens" in captured.err  # statistics go to stderr
    seeded = [*base, "--temperature", "1.0", "--seed", "7", "--json"]
    assert _json(capsys, *seeded)["text"] == _json(capsys, *seeded)["text"]
    lp = _json(capsys, *base, "--temperature", "0", "--json", "--logprobs", "2")
    assert len(lp["logprobs"]) == lp["completion_tokens"] and len(lp["logprobs"][0]["top"]) == 2


def test_generate_batch_file(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "prompt": "Once upon a time"},
        {"id": "b", "messages": [{"role": "user", "content": "Tell me a story"}]},
        {"id": "c", "prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", model_dir, "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--max-tokens", "6", "--seed", "1"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", "b", "c"]
    assert got[2]["completion_tokens"] <= 3 and all(g["completion_tokens"] <= 6 for g in got)
    assert all(isinstance(g["text"], str) and g["finish_reason"] for g in got)
    assert "3 prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-tokens", "0"], "max_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "0"], "top_p"),
        (["--prompt", "Once upon a time " * 30], "64 tokens"),
    ],
)
def test_generate_bad_input_is_one_clear_line(model_dir, capsys, args, needle):
    base = ["generate", "--model", model_dir]
    if "--prompt" not in args:
        base += ["--prompt", "hi"]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmloop: error:") and needle in err[0]


def test_long_prompt_names_both_numbers(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "Once upon a time " * 30]) == 2
    err = capsys.readouterr().err
    n = int(err.split("the prompt is ")[1].split()[0])
    assert n > 64 and "context of 64 tokens" in err


def test_unknown_model_lists_installed(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err


def test_chat_from_a_pipe(model_dir, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "conv.json"
    lines = f"hello there\n/save {saved}\n/reset\nanother one\n/save {tmp_path / 'b.json'}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    args = ["chat", "--model", model_dir, "--max-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) >= 2  # one answer line per message
    conv = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conv] == ["user", "assistant"]
    assert conv[0]["content"] == "hello there"
    after = json.loads((tmp_path / "b.json").read_text())["messages"]
    assert [m["content"] for m in after if m["role"] == "user"] == ["another one"]  # /reset
