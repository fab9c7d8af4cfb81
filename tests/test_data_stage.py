"""`lmloop data` end to end on tiny corpora: counts, round trip, determinism, reuse, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmloop.cli import main
from lmloop.data.pii import PII_KINDS
from lmloop.data.preprocess import normalize_text
from lmloop.data.shards import open_split, read_data_meta
from lmloop.tokenizer import Tokenizer

WORDS = (
    "the a cat dog sat ran on under big small red blue house tree river stone bird sang "
    "morning evening quickly slowly happy sad friend found lost gave took light dark"
).split()


def _story(rng: random.Random, n: int = 40) -> str:
    lines = []
    for _ in range(3):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n // 3)).capitalize() + ".")
    return "\n".join(lines)


@pytest.fixture
def corpus(tmp_path: Path) -> dict:
    rng = random.Random(7)
    stories = [_story(rng) for _ in range(40)]
    docs = list(stories)
    docs += [stories[0], stories[1].upper().replace("\n", "\n  ")]  # 2 exact dups (case/space)
    words = stories[2].split(" ")
    docs.append(" ".join(words[:-1] + ["zebra."]))  # 1 near duplicate (one word changed)
    docs += ["tiny", "   "]  # too short, empty
    f = tmp_path / "stories.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return {"path": f, "stories": stories}


def _decode_docs(d: Path, split: str) -> list[str]:
    tok = Tokenizer.load(d)
    eos = read_data_meta(d)["tokenizer"]["eos_id"]
    ids = np.asarray(open_split(d, split)[:])
    ends = np.nonzero(ids == eos)[0]
    assert len(ids) == 0 or ends[-1] == len(ids) - 1  # every document ends with EOS
    out, prev = [], 0
    for e in ends:
        out.append(tok.decode(ids[prev:e].tolist()))
        prev = e + 1
    return out


def test_prepare_counts_round_trip_and_reuse(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    args = ["data", "--source", str(corpus["path"]), "--out", str(out), "--vocab-size", "400"]
    assert main([*args, "val_fraction=0.2", "test_fraction=0.1"]) == 0
    meta = read_data_meta(out)
    removed = meta["removed"]
    assert removed["exact_duplicates"] == 2
    assert removed["near_duplicates"] == 1
    assert removed["too_short"] == 1 and removed["empty"] == 1
    sp = meta["splits"]
    assert sum(sp[s]["documents"] for s in sp) + removed["contaminated"] == 40
    assert sp["train"]["documents"] > 0 and sp["val"]["documents"] > 0
    assert meta["tokenizer"]["vocab_size"] <= 400 and meta["dtype"] == "uint16"
    for s in ("train", "val", "test"):
        assert len(open_split(out, s)) == sp[s]["tokens"]
    # decoding the shards gives back exactly the cleaned documents, each once
    decoded = [d for s in ("train", "val", "test") for d in _decode_docs(out, s)]
    cleaned = {normalize_text(s) for s in corpus["stories"]}
    assert set(decoded) <= cleaned and len(decoded) == len(set(decoded))
    assert len(cleaned - set(decoded)) == removed["contaminated"]
    assert (out / "report.md").read_text().startswith("# Data report")
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Tokenizer.load(out).sha256 == meta["tokenizer"]["sha256"]
    # same config, same inputs: reused, nothing rewritten
    before = (out / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "val_fraction=0.2", "test_fraction=0.1"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == before
    # a changed config rebuilds in place
    assert main([*args, "val_fraction=0.1", "test_fraction=0.1"]) == 0
    assert read_data_meta(out)["config"]["val_fraction"] == 0.1


def test_output_is_byte_identical_across_runs(corpus, tmp_path):
    base = ["data", "--source", str(corpus["path"]), "--vocab-size", "350", "shard_tokens=500"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--force"]) == 0
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len([f for f in files if f.suffix == ".bin"]) > 3  # several shards per split
    for rel in files:
        if rel.name in ("meta.json", "report.md"):  # these name the folder and the time
            continue
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_weights_pii_and_given_tokenizer(corpus, tmp_path):
    other = tmp_path / "contacts.txt"
    other.write_text("Write to someone@example.com or call 555-123-4567 from 192.168.1.20 soon.\n")
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--source", str(corpus["path"]), "--vocab-size", "300",
                 "--out", str(tok_dir)]) == 0  # fmt: skip
    out = tmp_path / "mixed"
    args = [
        "data",
        "--source", f"{corpus['path']}::weight=2",
        "--source", str(other),
        "--out", str(out),
        "--tokenizer", str(tok_dir),
        "scrub_pii=true", "val_fraction=0", "test_fraction=0", "near_dedup=false",
    ]  # fmt: skip
    assert main(args) == 0
    meta = read_data_meta(out)
    assert meta["pii"] == {**dict.fromkeys(PII_KINDS, 0), "email": 1, "phone": 1, "ip": 1}
    assert meta["tokenizer"]["sha256"] == Tokenizer.load(tok_dir).sha256
    stories, contacts = meta["sources"]
    assert stories["documents_kept"] == 41 and contacts["documents_kept"] == 1
    assert meta["splits"]["train"]["documents"] == 2 * 41 + 1
    docs = _decode_docs(out, "train")
    assert docs[-1] == "Write to [EMAIL] or call [PHONE] from [IP] soon."
    assert docs[0] == docs[1]  # weight 2: each story twice


def test_decontaminate_against_an_eval_set(corpus, tmp_path):
    evalset = tmp_path / "eval.txt"
    # a story's first 13 words, inside other text: the story must not be trained on
    first = normalize_text(corpus["stories"][5]).split()[:13]
    evalset.write_text("Benchmark item: " + " ".join(first) + " and more.")
    out = tmp_path / "d"
    args = ["data", "--source", str(corpus["path"]), "--out", str(out), "--vocab-size", "300",
            "--decontaminate-with", str(evalset), "val_fraction=0", "test_fraction=0"]  # fmt: skip
    assert main(args) == 0
    meta = read_data_meta(out)
    assert meta["removed"]["contaminated"] == 1
    assert normalize_text(corpus["stories"][5]) not in _decode_docs(out, "train")


def test_long_documents_are_cut_where_tokenization_agrees(tmp_path):
    from lmloop.data.pipeline import pieces
    from lmloop.data.preprocess import train_bpe

    rng = random.Random(1)
    text = "\n".join(_story(rng, 30) for _ in range(200))
    parts = pieces(text, 500)
    assert len(parts) > 10 and "".join(parts) == text
    backend = train_bpe([text], 400)
    whole = backend.encode(text).ids
    assert [i for p in parts for i in backend.encode(p).ids] == whole


def _assert_fails(args: list[str], out: Path, capsys, match: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or (out / "marker").exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers


def test_bad_inputs_exit_2_without_output(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    src = str(corpus["path"])
    _assert_fails(["data", "--source", str(tmp_path / "missing.txt"), "--out", str(out)], out,
                  capsys, "source not found")  # fmt: skip
    bad_gz = tmp_path / "bad.txt.gz"
    bad_gz.write_bytes(b"not gzip")
    _assert_fails(["data", "--source", str(bad_gz), "--out", str(out)], out, capsys,
                  "cannot read source file")  # fmt: skip
    _assert_fails(["data", "--source", f"{src}::field=body", "--out", str(out)], out, capsys,
                  "field 'body' not found; fields present: text")  # fmt: skip
    _assert_fails(["data", "--source", src, "--out", str(out), "min_chars=100000"], out, capsys,
                  "empty after filtering")  # fmt: skip
    _assert_fails(["data", "--source", src, "--out", str(out), "--vocab-size", "100"], out,
                  capsys, "vocab_size 100 is out of range")  # fmt: skip
    _assert_fails(["data", "--source", src, "--out", str(out), "--tokenizer", "no-such-model"],
                  out, capsys, "tokenizer not found")  # fmt: skip
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"some text then \xff\xfe invalid bytes here")
    _assert_fails(["data", "--source", str(bad), "--out", str(out), "strict_utf8=true"], out,
                  capsys, "at byte offset 15")  # fmt: skip
    # an existing output of another kind is left alone
    out.mkdir()
    (out / "marker").write_text("mine")
    _assert_fails(["data", "--source", src, "--out", str(out)], out, capsys,
                  "already exists and holds a folder that isn't an lmloop artifact")  # fmt: skip
    assert (out / "marker").read_text() == "mine"
    (out / "marker").unlink()
    (out / "meta.json").write_text(json.dumps({"schema": "lmloop.model", "format_version": 1}))
    (out / "marker").write_text("mine")
    _assert_fails(["data", "--source", src, "--out", str(out)], out, capsys,
                  "holds a 'lmloop.model' artifact")  # fmt: skip


def test_tokenizer_by_installed_model_name(corpus, tmp_path, monkeypatch):
    from lmloop.registry import spec as modelspec

    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--source", str(corpus["path"]), "--vocab-size", "300",
                 "--out", str(tok_dir)]) == 0  # fmt: skip
    fake = {"tiny-model": tok_dir / "tokenizer.json"}
    monkeypatch.setattr(modelspec, "installed_models", lambda: fake)
    out = tmp_path / "d"
    args = ["data", "--source", str(corpus["path"]), "--out", str(out), "--tokenizer", "tiny-model"]
    assert main(args) == 0
    assert read_data_meta(out)["tokenizer"]["sha256"] == Tokenizer.load(tok_dir).sha256
    assert main([*args[:-1], "tiny-modle"]) == 2
