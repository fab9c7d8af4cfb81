"""`lmloop eval` and `lmloop eval compare` through the CLI: reports, protocol labels, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_perplexity import CORPUS, make_hf_model

from lmloop.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def wiki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("text") / "wiki.test.raw"
    f.write_text("".join(CORPUS[:2]) * 2, encoding="utf-8")
    return f


def _eval(hf_dir: Path, text: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--model", str(hf_dir), "--text", str(text), "--out", str(out), *extra])


def test_eval_writes_labelled_report(hf_dir: Path, wiki: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ev"
    assert _eval(hf_dir, wiki, out, "--window", "32", "--documents", "--max-new-tokens", "4") == 0
    rep = json.loads((out / "report.json").read_text())
    for k in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert rep[k] > 0
    p, c = rep["protocol"], rep["counts"]
    assert (p["window"], p["stride"], p["documents"], p["mode"]) == (32, None, True, "disjoint")
    assert len(p["text_sha256"]) == 64 and len(rep["model"]["sha256"]) == 64
    assert len(rep["tokenizer"]["sha256"]) == 64
    # The WikiText file is split into its articles (two level-1 headings, written twice).
    assert c["documents"] == 2 and c["bytes"] == len(wiki.read_bytes())
    assert c["words"] > 0 and c["tokens"] > 0
    assert rep["samples"][0]["prompt"] == "Once upon a time"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["schema"] == "lmloop.eval" and meta["config"]["window"] == 32
    assert "token_perplexity" in (out / "report.md").read_text()
    assert "token_perplexity" in capsys.readouterr().out


def test_compare_ranks_only_matching_protocols(
    hf_dir: Path, wiki: Path, tmp_path: Path, capsys
) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, extra in ((a, []), (b, ["--batch-size", "1"])):
        assert _eval(hf_dir, wiki, d, "--window", "16", "--max-new-tokens", "0", *extra) == 0
    # c: the same run relabelled as a sliding-window one (a protocol field differs).
    rep = json.loads((a / "report.json").read_text())
    rep["protocol"] |= {"stride": 8, "mode": "sliding"}
    c.mkdir()
    (c / "report.json").write_text(json.dumps(rep))
    capsys.readouterr()
    assert main(["eval", "compare", str(a), str(b / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "protocols agree" in out and "1. " in out
    assert main(["eval", "compare", str(a), str(c)]) == 0
    out = capsys.readouterr().out
    assert "not ranked" in out and "stride" in out and "1. " not in out


def test_compare_rejects_a_non_report(tmp_path: Path, capsys) -> None:
    (tmp_path / "report.json").write_text('{"schema": "other"}')
    assert main(["eval", "compare", str(tmp_path)]) == 2
    assert "not an lmloop eval report" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--stride", "40", "--window", "32"], "stride 40 is larger than the window 32"),
        (["--window", "65"], "longer than the model's context of 64"),
    ],
)
def test_bad_protocol_exits_2(
    hf_dir: Path, wiki: Path, tmp_path: Path, capsys, args, needle
) -> None:
    assert _eval(hf_dir, wiki, tmp_path / "o", *args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_empty_text_exits_2(hf_dir: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    assert _eval(hf_dir, empty, tmp_path / "o") == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_foreign_tokenizer_exits_2(tmp_path: Path, wiki: Path, capsys) -> None:
    # A model whose vocabulary (100) is smaller than its folder's tokenizer (320 tokens).
    small = make_hf_model(tmp_path / "small", model_vocab=100)
    code = _eval(small, wiki, tmp_path / "o")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "does not belong to this model" in err or "vocab" in err.lower()


def _prepared_dir(root: Path, tok, texts: list[str]) -> Path:
    """A minimal `lmloop data` folder: tokenizer/, one test shard (EOS after each document)."""
    import numpy as np

    from lmloop.artifacts import make_meta, write_meta
    from lmloop.data.shards import ShardWriter

    root.mkdir(parents=True)
    tok.save(root / "tokenizer")
    w = ShardWriter(root, "test", np.dtype("<u2"))
    for t in texts:
        w.write(np.array([*tok.encode(t), tok.eos_id]))
    shards = w.close()
    splits = {"test": {"documents": len(texts), "tokens": w.tokens, "bytes": 0, "shards": shards}}
    tinfo = {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    write_meta(root, make_meta("lmloop.data", 1, None, splits=splits, tokenizer=tinfo))
    return root


def test_prepared_shards_score_like_their_text(hf_dir: Path, tmp_path: Path) -> None:
    from lmloop.evaluation.perplexity import evaluate_texts
    from lmloop.models.io import load_model

    loaded = load_model(str(hf_dir))
    data = _prepared_dir(tmp_path / "data", loaded.tokenizer, CORPUS)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(hf_dir), "--text", str(data), "--documents",
                 "--window", "32", "--max-new-tokens", "0", "--out", str(out)]) == 0  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    ref = evaluate_texts(loaded, CORPUS, window=32, documents=True, show_progress=False)
    assert rep["counts"]["documents"] == len(CORPUS)
    assert rep["counts"]["words"] == ref["counts"]["words"]
    assert rep["counts"]["bytes"] == ref["counts"]["bytes"]
    assert rep["token_perplexity"] == pytest.approx(ref["token_perplexity"], rel=1e-6)
    assert rep["protocol"]["split"] == "test"


def test_prepared_shards_with_another_tokenizer_exit_2(tmp_path: Path, capsys) -> None:
    from lmloop.models.io import load_model

    # Same model shape, but its tokenizer is trained on different text: another vocabulary.
    other = make_hf_model(tmp_path / "other")
    loaded = load_model(str(other))
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    from lmloop.tokenizer import Tokenizer

    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    b.train_from_iterator(
        ["zebra quartz jumps"] * 50,
        trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )  # fmt: skip
    foreign = Tokenizer.from_backend(b)
    data = _prepared_dir(tmp_path / "data", foreign, CORPUS)
    assert loaded.tokenizer.vocab_size >= foreign.vocab_size  # ids fit; only the vocab differs
    code = main(["eval", "--model", str(other), "--text", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "does not belong to this model" in err


def test_hf_dataset_folder_is_a_text_source(hf_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    ds_dir = tmp_path / "ds"
    Dataset.from_dict({"text": CORPUS}).save_to_disk(str(ds_dir))
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(hf_dir), "--text", str(ds_dir), "--documents",
                 "--max-new-tokens", "0", "--out", str(out)]) == 0  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["documents"] == len(CORPUS)
    assert rep["counts"]["bytes"] == sum(len(t.encode()) for t in CORPUS)
