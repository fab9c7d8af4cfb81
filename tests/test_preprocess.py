"""Preprocessing steps: cleaning, exact and near dedup, split, mixing, decontamination."""

from __future__ import annotations

import random

from lmloop.data.preprocess import (
    NearDedup,
    assign_split,
    clean_batch,
    copies,
    doc_key,
    exact_dedup,
    is_contaminated,
    ngram_hashes,
    normalize_text,
)


def test_normalize_nfc_controls_whitespace():
    raw = "  Cafe\u0301\r\nline\u00a0two \t\n\x00\x1b\n\n\n\nend\ufeff  "
    assert normalize_text(raw) == "Caf\u00e9\nline two\n\nend"


def test_clean_batch_counts_lengths():
    kept, counts = clean_batch(
        ["  ", "short", "long enough text", "x" * 50], min_chars=8, max_chars=20
    )
    assert kept == ["long enough text"]
    assert counts == {"empty": 1, "too_short": 1, "too_long": 1}


def test_exact_dedup_ignores_case_and_spacing():
    texts = ["Hello  World", "hello world", "other", "Other"]
    seen: set[bytes] = set()
    kept, dropped = exact_dedup([doc_key(t) for t in texts], seen)
    assert kept == [0, 2] and dropped == 2
    kept, dropped = exact_dedup([doc_key("HELLO WORLD")], seen)
    assert kept == [] and dropped == 1


def test_near_dedup_drops_small_edits_keeps_different():
    rng = random.Random(0)
    words = [f"w{rng.randrange(5000)}" for _ in range(400)]
    base = " ".join(words)
    edited = " ".join(words[:200] + ["changed"] + words[201:])
    other = " ".join(f"v{rng.randrange(5000)}" for _ in range(400))
    nd = NearDedup(threshold=0.8)
    kept, dropped = nd.filter([base, edited, other])
    assert kept == [0, 2] and dropped == 1
    # the state carries over between batches
    assert nd.filter([edited + " tail"]) == ([], 1)


def test_split_is_deterministic_and_near_fractions():
    keys = [doc_key(f"document number {i}") for i in range(4000)]
    a = [assign_split(k, 0.1, 0.05) for k in keys]
    assert a == [assign_split(k, 0.1, 0.05) for k in keys]
    assert 300 < a.count("val") < 500 and 120 < a.count("test") < 280
    assert all(assign_split(k, 0.0, 0.0) == "train" for k in keys[:50])


def test_copies_follow_weight_on_average():
    keys = [doc_key(str(i)) for i in range(2000)]
    assert all(copies(k, 2.0) == 2 for k in keys[:20])
    assert all(copies(k, 0.0) == 0 for k in keys[:20])
    half = sum(copies(k, 0.5) for k in keys)
    assert 850 < half < 1150
    assert [copies(k, 1.5) for k in keys] == [copies(k, 1.5) for k in keys]


def test_decontamination_13_grams():
    eval_text = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun"
    grams = ngram_hashes(eval_text, 13)
    assert len(grams) == 4
    assert is_contaminated(
        "Intro. The quick brown fox jumps over the lazy dog while the cat sleeps in!", grams
    )
    assert not is_contaminated("the quick brown fox jumps over the lazy dog while a cat", grams)
    assert not is_contaminated("anything", ngram_hashes("too short", 13))
