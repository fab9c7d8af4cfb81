"""`lmloop data --input-field IN --target-field OUT`: paired shards, pair dedup and
decontamination, the report's pair counts and both sides' length histograms."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from lmloop.cli import main
from lmloop.data.shards import open_pairs, read_pairs_meta
from lmloop.data.sources import SourceSpec, iter_pairs
from lmloop.errors import UserError
from lmloop.stages.data import DataConfig, run
from lmloop.tokenizer import Tokenizer

WORDS = (
    "the a cat dog sat ran on under big small red blue house tree river stone bird sang "
    "morning evening quickly slowly happy sad friend found lost gave took light dark"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture
def pairs(tmp_path: Path) -> dict:
    rng = random.Random(3)
    good = [(_sentence(rng, 30), _sentence(rng, 6)) for _ in range(60)]
    records = [{"story": a, "summary": b, "id": i} for i, (a, b) in enumerate(good)]
    records.append({"story": good[0][0].upper(), "summary": good[0][1]})  # exact dup (case)
    records.append({"story": good[1][0], "summary": "A different summary entirely."})  # kept
    records.append({"story": "Some long enough input.", "summary": None})  # empty side
    records.append({"story": "short", "summary": "x"})  # input too short
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"path": f, "good": good}


def _decode(out: Path, split: str) -> list[tuple[str, str]]:
    tok = Tokenizer.load(out)
    ps = open_pairs(out, split)
    eos = read_pairs_meta(out)["tokenizer"]["eos_id"]
    got = []
    for i in range(len(ps)):
        a, b = ps[i]
        assert a[-1] == eos and b[-1] == eos  # each side ends with EOS
        got.append((tok.decode(a[:-1].tolist()), tok.decode(b[:-1].tolist())))
    return got


def test_pairs_prepare_counts_round_trip_and_report(pairs, tmp_path, capsys):
    out = tmp_path / "data"
    args = ["data", "--source", str(pairs["path"]), "--out", str(out), "--vocab-size", "400"]
    args += ["--input-field", "story", "--target-field", "summary", "--min-chars", "10"]
    args += ["--decontaminate", "false"]
    assert main(args) == 0
    meta = read_pairs_meta(out)
    assert meta["schema"] == "lmloop.pairs"
    assert meta["removed"]["exact_duplicates"] == 1
    assert meta["removed"]["empty"] == 1 and meta["removed"]["too_short"] == 1
    splits = meta["splits"]
    assert sum(v["pairs"] for v in splits.values()) == 61  # 60 + the same input, new target
    decoded = {s: _decode(out, s) for s in splits}
    assert [len(v) for v in decoded.values()] == [v["pairs"] for v in splits.values()]
    everything = {p for v in decoded.values() for p in v}
    assert set(pairs["good"]) <= everything  # the pair survives the round trip, aligned
    assert (pairs["good"][1][0], "A different summary entirely.") in everything
    for side in ("input", "target"):  # histograms count every pair of every split
        hist = meta["lengths_log2"][side]
        assert {s: sum(h) for s, h in hist.items()} == {s: v["pairs"] for s, v in splits.items()}
    # targets (~7 words) sit in lower bins than inputs (~31 words)
    top = {side: max(i for i, n in enumerate(meta["lengths_log2"][side]["train"]) if n)
           for side in ("input", "target")}  # fmt: skip
    assert top["target"] < top["input"]
    report = (out / "report.md").read_text()
    assert f"| train | {splits['train']['pairs']:,} |" in report
    assert "| input tokens |" in report and "| target tokens |" in report
    assert (out / "lengths.png").stat().st_size > 1000
    # reuse: same config and inputs
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_pair_decontamination_drops_train_pairs_overlapping_eval(tmp_path, monkeypatch):
    rng = random.Random(5)
    good = [(_sentence(rng, 30), _sentence(rng, 20)) for _ in range(40)]
    f = tmp_path / "pairs.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["src", "tgt"])
        w.writerows(good)
    # an eval set whose text repeats one pair's target: that train pair must go
    leak = tmp_path / "bench.jsonl"
    leak.write_text(json.dumps({"text": good[7][1]}) + "\n")
    out = tmp_path / "data"
    args = ["data", "--source", str(f), "--out", str(out), "--vocab-size", "400"]
    args += ["--input-field", "src", "--target-field", "tgt", "--val-fraction", "0"]
    args += ["--test-fraction", "0", "--decontaminate-with", str(leak), "--ngram", "8"]
    assert main(args) == 0
    meta = read_pairs_meta(out)
    assert meta["removed"]["contaminated"] == 1
    kept = _decode(out, "train")
    assert len(kept) == 39 and good[7] not in kept

    # an eval set a teacher writes (`synthetic:`) is checked the same way; here the teacher
    # (`lmloop.data.synthetic.teacher_documents`, a model run) is replaced by its documents
    import lmloop.data.pipeline as pipeline

    def teacher(spec):
        assert spec.kind == "synthetic" and spec.path == "smollm2-135m-instruct"
        return [good[11][0]]

    monkeypatch.setattr(pipeline, "teacher_documents", teacher)
    out = tmp_path / "data-synthetic"
    args[args.index(str(leak))] = "synthetic:smollm2-135m-instruct"
    assert main([*args[:4], str(out), *args[5:]]) == 0
    meta = read_pairs_meta(out)
    assert meta["removed"]["contaminated"] == 1
    kept = _decode(out, "train")
    assert len(kept) == 39 and good[11] not in kept


def test_pairs_from_parquet_and_named_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": ["one input here", "two"], "a": ["first", None]}), f)
    assert list(iter_pairs(str(f), "q", "a")) == [("one input here", "first"), None]
    with pytest.raises(UserError, match="field 'answer' not found"):
        list(iter_pairs(str(f), "q", "answer"))
    with pytest.raises(UserError, match="pairs need both fields"):
        run(DataConfig(source=[SourceSpec(str(f))], out=str(tmp_path / "o"), input_field="q"))
