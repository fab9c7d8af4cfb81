"""`lmloop export`: HF folders load in plain transformers, GGUF files read back, same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from modelkit import greedy, lmloop_gpt, lmloop_llama, tiny_tokenizer

from lmloop.artifacts import atomic_dir, read_meta
from lmloop.cli import main
from lmloop.models.io import load_model, save_model

TOL = {"rtol": 1e-4, "atol": 1e-4}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _saved(path: Path, model, tok) -> Path:
    with atomic_dir(path) as tmp:
        save_model(tmp, model, tok)
    return path


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    "family,variant",
    [("llama", "tied"), ("llama", "untied"), ("gpt", "sinusoidal"), ("gpt", "learned")],
)
def test_hf_export_loads_in_transformers_with_same_logits_and_text(tmp_path, tok, family, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family == "llama":
        ours = lmloop_llama(tok.vocab_size, tied=variant == "tied")
    else:
        ours = lmloop_gpt(tok.vocab_size, positions=variant)
    src = _saved(tmp_path / "m", ours, tok)
    out = tmp_path / "hf"
    assert main(["export", "--model", str(src), "--format", "hf", "--out", str(out)]) == 0
    assert read_meta(out, "lmloop.export")["export"]["family"] == family
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"llama": "llama", "gpt": "gpt2"}[family]
    assert "auto_map" not in config  # no custom code

    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.encode(PROMPT)
    assert hf_tok.encode(PROMPT, add_special_tokens=False) == ids
    batch = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(batch).logits, ours(batch), **TOL)
    ours_text = tok.decode(greedy(ours, ids, 8))
    hf_text = hf_tok.decode(_hf_greedy(hf, ids, 8))
    assert hf_text == ours_text
    # the export folder is itself a model spec lmloop reads back (as a Hugging Face folder)
    back = load_model(str(out))
    assert back.kind == "hf" and back.model.config == ours.config
    with torch.no_grad():
        torch.testing.assert_close(back.model(batch), ours(batch), **TOL)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-2)])
def test_gguf_export_reads_back_through_transformers(tmp_path, tok, monkeypatch, dtype, tol):
    import gguf

    monkeypatch.setenv("LMLOOP_CACHE", str(tmp_path / "cache"))
    ours = lmloop_llama(tok.vocab_size, tied=dtype == "float32")
    src = _saved(tmp_path / "m", ours, tok)
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(src), "--format", "gguf", "--out", str(out)]
    assert main([*argv, "--dtype", dtype]) == 0

    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert "tokenizer.chat_template" in fields
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.attn_q.weight"] == ("F16" if dtype == "float16" else "F32")

    lm = load_model(str(out))  # transformers' GGUF reader un-permutes q/k
    assert lm.kind == "gguf" and lm.model.config.num_key_value_heads == 2
    batch = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(batch), ours(batch), rtol=tol, atol=tol)
    text = PROMPT + " <|im_start|>user\nhi<|im_end|>"
    assert lm.tokenizer.encode(text) == tok.encode(text)
    assert (lm.tokenizer.bos_id, lm.tokenizer.eos_id) == (tok.bos_id, tok.eos_id)
    if dtype == "float32":
        assert greedy(lm.model, tok.encode(PROMPT), 8) == greedy(ours, tok.encode(PROMPT), 8)
        # the dequantized conversion was cached by the file's hash; the next load reuses it
        assert len(list((tmp_path / "cache").glob("gguf-*"))) == 1
        again = load_model(str(out))
        with torch.no_grad():
            torch.testing.assert_close(again.model(batch), lm.model(batch), rtol=0, atol=0)


def test_gguf_refuses_gpt_family_and_bad_out(tmp_path, tok, capsys):
    src = _saved(tmp_path / "g", lmloop_gpt(tok.vocab_size), tok)
    out = tmp_path / "g.gguf"
    assert main(["export", "--model", str(src), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "supports the llama family" in err and "'gpt'" in err and "--format hf" in err
    assert not out.exists() and not list(tmp_path.glob(".g.gguf*"))
    assert main(["export", "--model", str(src), "--format", "gguf", "--out", str(tmp_path)]) == 2
    assert "writes one file" in capsys.readouterr().err
    assert main(["export", "--model", str(src), "--format", "onnx", "--out", str(out)]) == 2


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exported_files_get_the_users_umask(tmp_path, tok, mask):
    """The temporary sibling an export is written in (mkstemp: 0600, mkdtemp: 0700) is renamed
    into place: its mode must be what the user's umask gives a new file, not the temporary's."""
    import os

    src = _saved(tmp_path / "m", lmloop_llama(tok.vocab_size, tied=True), tok)
    old = os.umask(mask)
    try:
        for fmt, out in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf")):
            assert main(["export", "--model", str(src), "--format", fmt, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~mask
    files = [f for f in (tmp_path / "hf").rglob("*") if f.is_file()]
    assert files and {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~mask}
