"""Benchmark: precision and recall of `lmloop.data.pii` per kind on the labelled set.

The set is `tests/data/pii/cases.jsonl` (written by `tests/data/pii/make_cases.py`): sentences
holding one PII value of a known kind, and look-alike sentences holding none (dates, versions,
prices, ISBNs, order numbers, hashes, MACs, Luhn-failing card shapes, bad-check IBANs, ...).
Per kind K: a true positive is a K-labelled sentence whose value is covered entirely by one
K span (a half-masked card counts as missed); a false positive is a K span anywhere else (in a
negative, in another kind's sentence, or beside the labelled value). `tests/test_pii.py` asserts
the same figures stay >= 0.95.

    .venv/bin/python bench/pii.py            # the table, then each miss and false alarm
    .venv/bin/python bench/pii.py --quiet    # the table only
    .venv/bin/python bench/pii.py --quiet --throughput ../shared/data/kjv/kjv.txt
                                             # also MB/s scrubbing a file's paragraphs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "data" / "pii" / "cases.jsonl"
sys.path.insert(0, str(ROOT))

from lmloop.data.pii import PII_KINDS, find_pii, scrub_pii  # noqa: E402


def load_cases(path: Path = CASES) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def score(cases: list[dict]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """{kind: {tp, fp, fn, precision, recall}} and one line per error."""
    tally = {k: {"tp": 0, "fp": 0, "fn": 0} for k in PII_KINDS}
    errors: list[str] = []
    for case in cases:
        text, kind, value = case["text"], case["kind"], case["value"]
        vs = text.index(value) if kind else -1
        ve = vs + len(value) if kind else -1
        hit = False
        for span in find_pii(text):
            if span.kind == kind and span.start <= vs and span.end >= ve and not hit:
                hit = True
                continue
            tally[span.kind]["fp"] += 1
            errors.append(f"false {span.kind}: {text[span.start : span.end]!r} in {text!r}")
        if kind:
            tally[kind]["tp" if hit else "fn"] += 1
            if not hit:
                errors.append(f"missed {kind}: {value!r} in {text!r}")
    for t in tally.values():
        t["precision"] = t["tp"] / (t["tp"] + t["fp"]) if t["tp"] + t["fp"] else 1.0
        t["recall"] = t["tp"] / (t["tp"] + t["fn"]) if t["tp"] + t["fn"] else 1.0
    return tally, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=CASES)
    ap.add_argument("--quiet", action="store_true", help="print the table only")
    ap.add_argument("--throughput", type=Path, nargs="*", default=[], help="text files to time")
    args = ap.parse_args(argv)
    cases = load_cases(args.cases)
    t0 = time.perf_counter()
    tally, errors = score(cases)
    elapsed = time.perf_counter() - t0
    pos = sum(c["kind"] is not None for c in cases)
    print(f"{len(cases)} sentences: {pos} positives, {len(cases) - pos} look-alike negatives")
    print(f"{elapsed * 1e3 / len(cases):.2f} ms per sentence\n")
    print("| kind | positives | TP | FP | FN | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, t in tally.items():
        n = t["tp"] + t["fn"]
        print(
            f"| {k} | {n} | {t['tp']} | {t['fp']} | {t['fn']} "
            f"| {t['precision']:.3f} | {t['recall']:.3f} |"
        )
    for path in args.throughput:
        docs = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
        t0 = time.perf_counter()
        found = sum(sum(scrub_pii(d)[1].values()) for d in docs)
        secs = time.perf_counter() - t0
        mb = sum(map(len, docs)) / 1e6
        print(
            f"\n{path}: {mb:.2f} MB in {len(docs):,} paragraphs, {mb / secs:.2f} MB/s, {found} found"
        )
    if errors and not args.quiet:
        print("\n" + "\n".join(errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
