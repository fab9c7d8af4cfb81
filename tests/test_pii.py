"""PII scrubbing: precision and recall per kind on the labelled set, and the cases that once leaked.

The set (`tests/data/pii/cases.jsonl`) is written by `tests/data/pii/make_cases.py`; the scoring
is `bench/pii.py`'s, so the test and the figures in BENCHMARKS.md are one computation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmloop.data.pii import PII_KINDS, find_pii, iban_valid, luhn_valid, scrub_pii

ROOT = Path(__file__).resolve().parents[1]
CASES_DIR = ROOT / "tests" / "data" / "pii"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_pii", ROOT / "bench" / "pii.py")


def test_case_file_is_what_the_generator_writes():
    gen = _load("make_pii_cases", CASES_DIR / "make_cases.py")
    assert (CASES_DIR / "cases.jsonl").read_text(encoding="utf-8") == gen.render()


def test_precision_and_recall_per_kind_at_least_095(bench):
    cases = bench.load_cases()
    positives = [c for c in cases if c["kind"]]
    negatives = [c for c in cases if not c["kind"]]
    assert len(positives) >= 200 and len(negatives) >= 200
    assert {c["kind"] for c in positives} == set(PII_KINDS)
    lookalikes = {c["lookalike"] for c in negatives}
    assert {"date", "version", "price", "isbn", "order", "hash"} <= lookalikes
    tally, errors = bench.score(cases)
    for kind, t in tally.items():
        assert t["tp"] + t["fn"] >= 20, kind
        assert t["precision"] >= 0.95 and t["recall"] >= 0.95, (kind, t, errors[:10])


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("call 5551234567 now", "phone"),
        ("call +15551234567 now", "phone"),
        ("call (555) 123-4567 now", "phone"),
        ("ring +44 20 7946 0958", "phone"),
        ("ssn 123-45-6789 ok", "ssn"),
        ("host 2001:db8::1 is up", "ip"),
        ("host ::ffff:192.0.2.1 is up", "ip"),
        ("card 4111 1111 1111 1111 exp", "card"),
        ("card 378282246310005 exp", "card"),
        ("iban GB82 WEST 1234 5698 7654 32 ok", "iban"),
        ("key AKIAIOSFODNN7EXAMPLE ok", "secret"),
        ("see https://bob:hunter2@example.com/x", "credentials"),
    ],
)
def test_values_that_used_to_pass_through(text, kind):
    spans = find_pii(text)
    assert [s.kind for s in spans] == [kind], spans
    out, counts = scrub_pii(text)
    assert counts[kind] == 1 and f"[{kind.upper()}]" in out
    assert not any(ch.isdigit() for ch in out), out  # nothing half-masked


def test_scrub_replaces_every_kind_and_keeps_the_rest():
    text = (
        "Mail jane.doe+x@example.co.uk, call (555) 123-4567 or +44 20 7946 0958, "
        "server 10.0.0.255, token ghp_" + "a1" * 18 + ". Genesis 1:1, year 1611, v1.2.3.4, "
        "3.14159, 2024-01-15, ISBN 0-306-40615-2, icon@2x.png, std::io."
    )
    out, counts = scrub_pii(text)
    assert counts == {**dict.fromkeys(PII_KINDS, 0), "email": 1, "phone": 2, "ip": 1, "secret": 1}
    assert out.startswith("Mail [EMAIL], call [PHONE] or [PHONE], server [IP], token [SECRET].")
    assert out.endswith(
        "Genesis 1:1, year 1611, v1.2.3.4, 3.14159, 2024-01-15, ISBN 0-306-40615-2, "
        "icon@2x.png, std::io."
    )


def test_private_key_block_is_one_secret():
    block = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    out, counts = scrub_pii(f"my key:\n{block}\nthanks")
    assert out == "my key:\n[SECRET]\nthanks" and counts["secret"] == 1


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE88370400440532013000")
    assert not iban_valid("DE8937040044053201300")  # one character short for DE


def test_thousands_of_matches_in_one_text():
    text = " ".join(f"a{i}@example.com 555-123-{i % 10000:04d}" for i in range(3000))
    out, counts = scrub_pii(text)
    assert counts["email"] == 3000 and counts["phone"] == 3000
    assert out.count("[EMAIL]") == 3000 and out.count("[PHONE]") == 3000
