"""`lmloop data --engine ray` on a local 2-worker cluster: the same bytes as one process.

One cluster serves the module (Ray takes seconds to start). Each source file is its own unit,
and the planted duplicates sit in other files than their originals, so only dedup grouped
across the whole corpus finds them.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from lmloop.cli import main
from lmloop.data import ray_engine
from lmloop.data.pipeline import Packer
from lmloop.data.ray_engine import near_drops

WORDS = (
    "the a cat dog sat ran on under big small red blue house tree river stone bird sang morning "
    "evening quickly slowly happy sad friend found lost gave took light dark old new green warm"
).split()


def _story(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return "\n".join(" ".join(words[i : i + 15]).capitalize() + "." for i in range(0, n, 15))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    faults = tmp_path_factory.mktemp("faults")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield faults
    ray.shutdown()


def _dies_once(folder: Path) -> ray_engine.Probe:
    """A probe for the tasks: the first task to reach `point` while `folder/point` exists
    removes the file and kills its own worker process, as a lost node would. (A nested
    function: Ray pickles it by value, so the workers need not import this test module.)"""
    faults = str(folder)

    def probe(point: str) -> None:
        try:
            os.unlink(os.path.join(faults, point))
        except FileNotFoundError:
            return
        os._exit(1)

    return probe


@pytest.fixture(autouse=True)
def one_file_per_unit(monkeypatch):
    monkeypatch.setattr(ray_engine, "UNIT_BYTES", 1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four JSONL files and a text file: exact duplicates (3 across JSONL files, 5 of the text
    file's paragraphs repeating JSONL stories), near duplicates in other files than their
    originals, documents made of halves of two others (contaminated once one lands in val/test),
    PII and a too-short document."""
    rng = random.Random(3)
    stories = [_story(rng, rng.randint(60, 160)) for _ in range(180)]
    files: list[list[str]] = [stories[i:160:4] for i in range(4)]
    files[3] += [stories[0], stories[1].upper().replace("\n", "\n  "), stories[2]]  # exact
    for i in range(4, 16):  # one word changed; the original is in another file
        words = stories[i].split(" ")
        files[(i + 1) % 4].append(" ".join(words[:-1] + ["zebra."]))
    for i in range(16, 40, 2):  # halves of two stories: shares 13-grams with both
        a, b = stories[i].split(" "), stories[i + 1].split(" ")
        files[i % 4].append(" ".join(a[: len(a) // 2] + b[len(b) // 2 :]))
    files[1] += ["tiny", "Mail ann@example.com or call 555-123-4567 from 10.0.0.1, " * 3]
    root = tmp_path_factory.mktemp("corpus")
    for k, docs in enumerate(files):
        lines = "\n".join(json.dumps({"text": d}) for d in docs)
        (root / f"part-{k}.jsonl").write_text(lines + "\n")
    (root / "notes.txt").write_text("\n\n".join(stories[160:] + stories[40:45]) + "\n")
    return root


BASE = ["--vocab-size", "400", "shard_tokens=1500", "val_fraction=0.2", "test_fraction=0.1"]


def _both(tmp: Path, args: list[str]) -> dict:
    """Run one process, then Ray, into the same --out; assert every file is the same bytes
    (meta.json: all but its creation time). Returns the meta."""
    out = tmp / "out"
    assert main(["data", *args, "--out", str(out)]) == 0
    out.rename(tmp / "local")
    assert main(["data", *args, "--out", str(out), "--engine", "ray"]) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    local = tmp / "local"
    assert files == sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".bin"]) > 3
    for rel in files:
        a, b = (tmp / "local" / rel).read_bytes(), (out / rel).read_bytes()
        if rel.name == "meta.json":
            a, b = json.loads(a), json.loads(b)
            assert a.pop("created") and b.pop("created")
        assert a == b, rel
    return json.loads((out / "meta.json").read_text())


def test_same_bytes_as_one_process(cluster, corpus, tmp_path):
    args = [
        "--source",
        str(corpus / "*.jsonl"),
        "--source",
        f"{corpus}/notes.txt::split=blank,weight=0.5",
    ]
    meta = _both(tmp_path, [*args, *BASE])
    removed = meta["removed"]
    assert removed["exact_duplicates"] == 3 + 5 and removed["too_short"] == 1
    assert removed["near_duplicates"] >= 10  # LSH finds most of the 12 (it is probabilistic)
    assert removed["contaminated"] > 0 and removed["sampled_out"] > 0
    assert "engine" not in meta["config"]


def test_given_tokenizer_streaming_pii_and_eval_set(cluster, corpus, tmp_path):
    tok = tmp_path / "tok"
    assert (
        main(["data", "--source", f"{corpus}/notes.txt::split=blank", "--out", str(tok), *BASE])
        == 0
    )
    evalset = tmp_path / "eval.txt"
    evalset.write_text(json.loads((corpus / "part-2.jsonl").read_text().splitlines()[5])["text"])
    args = ["--source", str(corpus), "--tokenizer", str(tok), "--decontaminate-with",
            str(evalset), "scrub_pii=true", "val_fraction=0", "test_fraction=0",
            "shard_tokens=1500"]  # fmt: skip
    meta = _both(tmp_path, args)
    assert meta["removed"]["contaminated"] >= 1 and meta["pii"]["email"] == 3


def test_killed_workers_are_retried_with_the_same_output(cluster, corpus, tmp_path, monkeypatch):
    for point in ("read", "bands", "encode"):  # each kills the worker of one task, once
        (cluster / point).touch()
    probed = functools.partial(ray_engine.tokenize_and_pack, probe=_dies_once(cluster))
    monkeypatch.setattr(ray_engine, "tokenize_and_pack", probed)
    _both(tmp_path, ["--source", str(corpus / "*.jsonl"), *BASE])
    assert not list(cluster.iterdir())  # every fault fired


def test_file_url_source(cluster, corpus, tmp_path):
    meta = _both(tmp_path, ["--source", f"file://{corpus}/part-*.jsonl", *BASE])
    assert meta["config"]["source"][0]["path"].startswith("file://")
    plain = tmp_path / "plain"
    assert main(["data", "--source", str(corpus / "part-*.jsonl"), *BASE, "--out", str(plain)]) == 0
    for shard in plain.glob("*.bin"):
        assert shard.read_bytes() == (tmp_path / "out" / shard.name).read_bytes()


def test_interrupted_or_failed_job_leaves_no_output(cluster, corpus, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(self, flat):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Packer, "write", interrupted)
    out = tmp_path / "out"
    args = ["data", "--source", str(corpus / "*.jsonl"), *BASE, "--engine", "ray"]
    assert main([*args, "--out", str(out)]) != 0
    assert len(calls) == 2 and not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    # a user error inside a task (a bad JSON line) is reported as one line, as in one process
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine enough text here"}\n')
    (bad / "b.jsonl").write_text('{"text": "also fine"}\n{not json\n')
    capsys.readouterr()
    assert main(["data", "--source", str(bad), "--out", str(out), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "b.jsonl:2: not valid JSON" in err and "Traceback" not in err
    assert not out.exists()


class _Counted:
    """Stands in for a dedup reduce task on the driver: counts the rows of its range in the
    units' sorted key column, then submits the real task."""

    def __init__(self, task, column: int):
        self.task, self.column, self.rows = task, column, []

    def remote(self, lo: int, hi: int, *units):
        keys = np.concatenate([u[self.column] for u in ray.get(list(units))])
        inside = (keys >= np.uint64(lo)) & (keys <= np.uint64(hi - 1))
        self.rows.append((int(inside.sum()), len(keys)))
        return self.task.remote(lo, hi, *units)


def test_dedup_tasks_each_hold_a_bounded_share_of_the_hashes(
    cluster, corpus, tmp_path, monkeypatch
):
    # the corpus-wide dedup steps run in as many tasks as keep each one's rows near
    # SHUFFLE_ROWS (more than one per CPU here), each a range of hashes; same bytes
    monkeypatch.setattr(ray_engine, "SHUFFLE_ROWS", 40)
    exact = _Counted(ray_engine._exact_duplicates, 1)
    bands = _Counted(ray_engine._band_groups, 2)
    monkeypatch.setattr(ray_engine, "_exact_duplicates", exact)
    monkeypatch.setattr(ray_engine, "_band_groups", bands)
    _both(tmp_path, ["--source", str(corpus / "*.jsonl"), *BASE])
    for task, per_row in ((exact, 1), (bands, 9)):  # 9 LSH bands a document
        held = [n for n, _ in task.rows]
        total = task.rows[0][1]
        assert total > 40 * 2 * 2 and total % per_row == 0
        assert sum(held) == total  # every hash in exactly one task
        assert len(held) == -(-total // 40) and max(held) <= 2 * 40, held


def test_near_dedup_keeps_what_the_sequential_pass_keeps():
    # A~B and B~C but not A~C: one process keeps A, drops B, then keeps C (B was never kept);
    # "keep the first of each connected component" would wrongly drop C.
    groups = [(np.array([1, 2, 7, 9]), np.array([2, 2])), (np.array([2, 3]), np.array([2]))]
    assert near_drops(groups).tolist() == [2, 9]


def test_near_drops_equals_the_sequential_band_index():
    # random band keys from a small space (many collisions, chains across bands), grouped as
    # the band-grouping tasks return them, split over several tasks; the reference is the
    # one-process pass: a document goes when a band key of its is in an earlier kept one's
    rng = np.random.default_rng(5)
    for _ in range(20):
        n, bands = int(rng.integers(5, 80)), 3
        keys = rng.integers(0, n // 2 + 2, size=(n, bands))
        index: list[set] = [set() for _ in range(bands)]
        expected = []
        for d in range(n):
            if any(k in index[b] for b, k in enumerate(keys[d])):
                expected.append(d)
            else:
                for b, k in enumerate(keys[d]):
                    index[b].add(k)
        tasks: list[tuple[list, list]] = [([], []) for _ in range(3)]
        for b in range(bands):
            for k in np.unique(keys[:, b]):
                ids = np.flatnonzero(keys[:, b] == k)
                if len(ids) > 1:
                    members, sizes = tasks[int(k) % 3]
                    members += ids.tolist()
                    sizes.append(len(ids))
        groups = [(np.array(m, np.int64), np.array(z, np.int64)) for m, z in tasks]
        assert near_drops(groups).tolist() == expected


def test_one_process_path_never_imports_ray(corpus, tmp_path):
    code = (
        "import sys; from lmloop.cli import main; "
        f"assert main(['data', '--source', {str(corpus / 'part-0.jsonl')!r}, '--out', "
        f"{str(tmp_path / 'o')!r}, '--vocab-size', '300']) == 0; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    env = {**os.environ, "LMLOOP_NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
