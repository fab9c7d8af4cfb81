"""The offline story -> summary pairs (`lmloop.data.synthetic.summary_pairs`): the targets, the
openings that carry their facts, and the teacher cache's key. A tiny random Llama folder stands
in for the shipped teacher (same engine, same cache; milliseconds instead of a 135M model)."""

from __future__ import annotations

import json

import pytest
from modelkit import hf_llama, save_hf, tiny_tokenizer

from lmloop.data import synthetic
from lmloop.data.synthetic import (
    OPENINGS,
    pair_rows,
    story_parts,
    summary_of,
    summary_openings,
    summary_pairs,
)

FOX = {"character": "a little fox", "place": "in a big forest", "object": "a red ball",
       "theme": "sharing"}  # fmt: skip


def test_summary_names_the_three_facts():
    assert summary_of(FOX) == "A little fox with a red ball in a big forest."
    lily = {**FOX, "character": "a curious girl named Lily", "place": "at school"}
    assert summary_of(lily) == "A curious girl named Lily with a red ball at school."


def test_openings_state_every_fact_of_the_summary():
    parts = story_parts(200, seed=3)
    openings = summary_openings(parts, seed=3)
    assert openings == summary_openings(parts, seed=3)  # deterministic
    assert openings != summary_openings(parts, seed=4)
    for p, o in zip(parts, openings):
        assert o.startswith("Once upon a time, ")
        assert all(p[k] in o for k in ("character", "place", "object"))
    # every phrasing is used, so a fact's position in the story varies
    used = {next(i for i, t in enumerate(OPENINGS) if t.format(**p) == o)
            for p, o in zip(parts, openings)}  # fmt: skip
    assert used == set(range(len(OPENINGS)))
    # the openings draw from their own stream: the stories' choices are story_parts' as before
    assert story_parts(3, seed=0) == story_parts(3, seed=0)[:3]


def test_pair_rows_keep_stories_that_go_on():
    parts = [FOX, {**FOX, "character": "a tiny robot"}, {**FOX, "place": "by the sea"}]
    openings = summary_openings(parts)
    stories = [openings[0] + " She shared it.", openings[1], ""]  # 2nd: cut back to its opening
    rows = pair_rows(parts, openings, stories)
    assert rows == [
        {"story": stories[0], "summary": "A little fox with a red ball in a big forest."}
    ]
    with pytest.raises(ValueError):  # misaligned stories are a bug, not data
        pair_rows(parts, openings, stories[:2])


@pytest.fixture
def teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOOP_CACHE", str(tmp_path / "cache"))
    return _teacher_folder(tmp_path / "teacher")


def _teacher_folder(folder, seed: int = 0):
    tok = tiny_tokenizer()
    model = hf_llama(tok.vocab_size, tied=True, seed=seed)
    model.config.max_position_embeddings = 512  # room for the story prompt (RoPE: no table)
    save_hf(model, tok, folder)
    return folder


def _no_teacher(*a, **kw):
    raise AssertionError("the teacher was loaded: the cache missed")


def test_cache_is_keyed_by_settings_and_read_without_the_teacher(teacher, tmp_path, monkeypatch):
    import lmloop.engine

    report: dict = {}
    path = summary_pairs(4, teacher=str(teacher), max_tokens=6, batch=4, int8=False, report=report)
    assert report["cached"] is False and report["tokens"] > 0
    cached = [json.loads(ln)["text"] for ln in open(report["path"], encoding="utf-8")]
    openings = summary_openings(story_parts(4))
    assert len(cached) == 4  # one per story, aligned with its choices (none dropped here)
    assert all(c.startswith(o) for c, o in zip(cached, openings))
    rows = [json.loads(ln) for ln in path.read_text("utf-8").splitlines()]
    expected = pair_rows(story_parts(4), openings, cached)
    assert rows == expected
    assert [r["summary"] for r in rows] == [summary_of(p) for p in story_parts(4)]

    monkeypatch.setattr(lmloop.engine, "load_engine", _no_teacher)
    again: dict = {}
    assert summary_pairs(4, teacher=str(teacher), max_tokens=6, batch=4, int8=False,
                         report=again) == path  # fmt: skip
    assert again["cached"] is True and again["path"] == report["path"]
    assert [json.loads(ln) for ln in path.read_text("utf-8").splitlines()] == expected
    # any setting that changes the stories is in the key: each of these must run the teacher
    for change in ({"n": 5}, {"max_tokens": 7}, {"seed": 1}):
        kw = {"n": 4, "max_tokens": 6, **change}
        with pytest.raises(AssertionError, match="cache missed"):
            summary_pairs(kw.pop("n"), teacher=str(teacher), batch=4, int8=False, **kw)
    # and so is the teacher's weights
    other = _teacher_folder(tmp_path / "other", seed=1)
    assert synthetic._files_digest(str(other)) != synthetic._files_digest(str(teacher))
    with pytest.raises(AssertionError, match="cache missed"):
        summary_pairs(4, teacher=str(other), max_tokens=6, batch=4, int8=False)
