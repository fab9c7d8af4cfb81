"""`lmloop tokenizer train`: a byte-level BPE with lmloop's special tokens, reusable, checked."""

from __future__ import annotations

import json

from lmloop.artifacts import read_meta
from lmloop.cli import main
from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer


def _corpus(tmp_path):
    f = tmp_path / "c.txt"
    lines = [f"the river {i} runs past the old mill and the miller sings" for i in range(200)]
    f.write_text("\n\n".join(lines))
    return f


def test_train_save_load_round_trip(tmp_path, capsys):
    src, out = _corpus(tmp_path), tmp_path / "tok"
    args = ["tokenizer", "train", "--source", f"{src}::split=blank", "--vocab-size", "320",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    meta = read_meta(out, "lmloop.tokenizer")
    assert meta["trained_on"]["documents"] == 200
    tok = Tokenizer.load(out)
    assert tok.vocab_size == meta["vocab_size"] <= 320
    vocab = tok.get_vocab()
    assert all(t in vocab for t in SPECIAL_TOKENS)
    assert tok.eos_id == vocab["<|endoftext|>"] and tok.pad_id == vocab["<|pad|>"]
    text = "the miller sings: café ☕ 42\n\tdone"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: every string round-trips
    assert (
        len(tok.encode("the river runs past the old mill"))
        < len("the river runs past the old mill") / 2
    )
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert vocab["<|im_start|>"] in tok.encode(chat)
    # reuse, then forced retraining gives the same bytes
    before = (out / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0
    assert (out / "tokenizer.json").read_bytes() == before


def test_bad_inputs(tmp_path, capsys):
    src, out = _corpus(tmp_path), tmp_path / "tok"
    base = ["tokenizer", "train", "--source", str(src), "--out", str(out)]
    assert main([*base, "--vocab-size", "10"]) == 2
    assert "vocab_size 10 is out of range" in capsys.readouterr().err
    assert main([*base, "--vocab-size", str(1 << 21)]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    assert main(["tokenizer", "train", "--source", str(empty), "--out", str(out)]) == 2
    assert "no text to train on" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"schema": "lmloop.data", "format_version": 1}))
    assert main(base) == 2
    assert "holds a 'lmloop.data' artifact" in capsys.readouterr().err
