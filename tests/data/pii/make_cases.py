"""Write `cases.jsonl`: the labelled PII test set (positives per kind and look-alike negatives).

Run from the repository root: `python tests/data/pii/make_cases.py` (deterministic: seeded).
Every value is written here by hand or generated below, none copied from a corpus: fictional
phone ranges (NANP 555, Ofcom's drama numbers), issuers' published test card numbers, IBANs with
random account numbers and computed check digits, SSNs in issued ranges, documentation IP
ranges, and random keys behind each provider's published prefix.

Each line: {"text", "kind" (a PII kind, or null for a negative), "value" (the exact substring
that must be replaced; for `credentials` the `user:password` part), "lookalike" (negatives: what
the text resembles)}.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

rng = random.Random(15)
OUT = Path(__file__).with_name("cases.jsonl")


def pick(xs):
    return rng.choice(xs)


def rand(chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
UPNUM = string.ascii_uppercase + string.digits
HEX = "0123456789abcdef"

# ---- positives ---------------------------------------------------------------------------------
POS_TEMPLATES = [
    "You can reach me at {v} after five.",
    "Contact: {v}",
    "{v} is what I gave the bank last week.",
    "Please update my record to {v}, thanks!",
    "I wrote it on the form as {v} but it bounced.",
    "My details ({v}) are in the attached letter.",
    "ok so the value is {v}; does that look right?",
    "Forwarding this: {v}\nLet me know.",
    "- {v}",
    "Use {v} for anything urgent.",
]

FIRST = ["jane", "john", "maria", "li.wei", "o.connor", "ahmed", "sofia", "k.tanaka", "priya"]
LAST = ["doe", "smith", "garcia", "nguyen", "mueller", "rossi", "kowalski", "silva", "okafor"]
DOMAINS = [
    "example.com",
    "example.org",
    "mail.example.co.uk",
    "test.example.net",
    "uni.example.edu",
]


def emails(n):
    out = []
    for _ in range(n):
        local = pick(
            [
                f"{pick(FIRST)}.{pick(LAST)}",
                f"{pick(FIRST)}{rng.randrange(10, 99)}",
                f"{pick(FIRST)}+{pick(['news', 'shop', 'x'])}",
                f"{pick(LAST)}_{pick(FIRST)}",
            ]
        )
        out.append(f"{local}@{pick(DOMAINS)}")
    return out


def phones():
    out = []
    for _ in range(24):  # North American, fictional 555 exchange/area
        a, b = rng.choice(["555", "212", "415", "617", "312"]), "555"
        c = f"01{rng.randrange(10)}{rng.randrange(10)}"
        if a == "555":
            b = f"{rng.randrange(100, 999)}"
            c = f"{rng.randrange(1000, 9999)}"
        fmt = rng.randrange(8)
        out.append(
            [
                f"{a}{b}{c}",
                f"+1{a}{b}{c}",
                f"({a}) {b}-{c}",
                f"{a}-{b}-{c}",
                f"{a}.{b}.{c}",
                f"+1 {a} {b} {c}",
                f"1-{a}-{b}-{c}",
                f"+1 ({a}) {b}-{c}",
            ][fmt]
        )
    out += ["5551234567", "+15551234567", "1-800-555-0199", "(555) 123-4567"]
    for _ in range(14):  # international
        out.append(
            pick(
                [
                    f"+44 20 7946 0{rng.randrange(100, 999)}",
                    f"+44 113 496 0{rng.randrange(100, 999)}",
                    f"+61 491 570 {rng.randrange(100, 159)}",
                    f"+49 30 {rng.randrange(1000000, 9999999)}",
                    f"+33 1 {rng.randrange(10, 99)} {rng.randrange(10, 99)} "
                    f"{rng.randrange(10, 99)} {rng.randrange(10, 99)}",
                    f"+81 3-{rng.randrange(1000, 9999)}-{rng.randrange(1000, 9999)}",
                    f"+91 98{rng.randrange(100, 999)} {rng.randrange(10000, 99999)}",
                    f"+34 91 {rng.randrange(100, 999)} {rng.randrange(10, 99)} "
                    f"{rng.randrange(10, 99)}",
                ]
            )
        )
    return out


# Issuers' published test numbers (Stripe, PayPal, Adyen documentation).
TEST_CARDS = [
    "4111111111111111", "4242424242424242", "4012888888881881", "4000056655665556",
    "5555555555554444", "5105105105105100", "2223003122003222", "5200828282828210",
    "378282246310005", "371449635398431", "6011111111111117", "6011000990139424",
    "3056930009020004", "36227206271667", "3566002020360505", "6200000000000005",
]  # fmt: skip


def cards():
    out = []
    for c in TEST_CARDS:
        groups = [c[i : i + 4] for i in range(0, len(c), 4)]
        if len(c) == 15:
            groups = [c[:4], c[4:10], c[10:]]
        out += [c, " ".join(groups), "-".join(groups)]
    return out[:44]


def iban_check(country: str, bban: str) -> str:
    digits = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


IBAN_SHAPES = {  # country: BBAN shape (n = digit, a = upper letter, c = alphanumeric)
    "DE": "n" * 18, "GB": "aaaa" + "n" * 14, "FR": "n" * 10 + "c" * 11 + "nn",
    "NL": "aaaa" + "n" * 10, "ES": "n" * 20, "IT": "a" + "n" * 10 + "c" * 12,
    "BE": "n" * 12, "CH": "n" * 5 + "c" * 12, "AT": "n" * 16, "PL": "n" * 24,
}  # fmt: skip


def ibans():
    out = []
    for i in range(40):
        country = list(IBAN_SHAPES)[i % len(IBAN_SHAPES)]
        chars = {"n": string.digits, "a": string.ascii_uppercase, "c": UPNUM}
        bban = "".join(rng.choice(chars[t]) for t in IBAN_SHAPES[country])
        iban = iban_check(country, bban)
        out.append(" ".join(iban[j : j + 4] for j in range(0, len(iban), 4)) if i % 2 else iban)
    return out


def ssns():
    out = ["123-45-6789"]
    while len(out) < 40:
        area = rng.randrange(1, 900)
        if area == 666:
            continue
        sep = "-" if rng.random() < 0.8 else " "
        out.append(f"{area:03d}{sep}{rng.randrange(1, 100):02d}{sep}{rng.randrange(1, 10000):04d}")
    return out


def ips():
    out = ["2001:db8::1", "::1", "fe80::1", "::ffff:192.0.2.33", "2001:db8:0:0:0:0:2:1"]
    for _ in range(18):
        out.append(
            pick(
                [
                    f"192.0.2.{rng.randrange(1, 255)}",
                    f"198.51.100.{rng.randrange(1, 255)}",
                    f"203.0.113.{rng.randrange(1, 255)}",
                    f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                    f"172.16.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                ]
            )
        )
    for _ in range(17):
        groups = [rand(HEX, rng.randrange(1, 5)) for _ in range(rng.randrange(2, 5))]
        out.append(
            pick(
                [
                    "2001:db8:" + ":".join(groups) + "::" + rand(HEX, 2),
                    "2001:db8::" + ":".join(groups),
                    "fe80::" + ":".join(groups[:3]),
                    "2001:0db8:" + ":".join(rand(HEX, 4) for _ in range(6)),
                ]
            )
        )
    return out


def credentials():
    users = ["bob", "admin", "deploy", "jane.doe", "svc_backup", "root"]
    pws = ["hunter2", "s3cr3t!", "Tr0ub4dor", "correct-horse", "p%40ss", "x9Kq2LmZ"]
    hosts = [
        "example.com",
        "db.example.internal:5432/app",
        "ftp.example.org/pub",
        "cache.example:6379",
    ]
    schemes = ["https", "http", "postgres", "mysql", "redis", "ftp", "amqp", "mongodb+srv"]
    out = []
    for _ in range(36):
        cred = f"{pick(users)}:{pick(pws)}"
        out.append((f"{pick(schemes)}://{cred}@{pick(hosts)}", cred))
    return out


def secrets():
    out = []
    makers = [
        lambda: "sk-" + rand(ALNUM, 48),
        lambda: "sk-proj-" + rand(ALNUM + "_-", 56),
        lambda: "sk-ant-api03-" + rand(ALNUM + "_-", 60),
        lambda: "ghp_" + rand(ALNUM, 36),
        lambda: "github_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59),
        lambda: "gho_" + rand(ALNUM, 36),
        lambda: "AKIA" + rand(UPNUM, 16),
        lambda: "xoxb-" + rand(string.digits, 12) + "-" + rand(ALNUM, 24),
        lambda: "xoxp-" + rand(string.digits, 12) + "-" + rand(string.digits, 12) + "-" + rand(ALNUM, 24),
        lambda: "AIza" + rand(ALNUM + "_-", 35),
        lambda: "sk_live_" + rand(ALNUM, 24),
        lambda: "hf_" + rand(ALNUM, 34),
        lambda: "glpat-" + rand(ALNUM, 20),
        lambda: "npm_" + rand(ALNUM, 36),
        lambda: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI" + rand(ALNUM, 20) + "." + rand(ALNUM + "_-", 43),
    ]  # fmt: skip
    for i in range(36):
        out.append(makers[i % len(makers)]())
    for kind in ("RSA ", "EC ", "OPENSSH ", ""):
        body = "\n".join(rand(ALNUM + "+/", 64) for _ in range(3))
        out.append(f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----")
    return out


def positives():
    rows = []
    for kind, values in (
        ("email", emails(40)),
        ("phone", phones()),
        ("card", cards()),
        ("iban", ibans()),
        ("ssn", ssns()),
        ("ip", ips()),
        ("secret", secrets()),
    ):
        for v in values:
            rows.append({"text": pick(POS_TEMPLATES).format(v=v), "kind": kind, "value": v})
    for url, cred in credentials():
        rows.append(
            {"text": pick(POS_TEMPLATES).format(v=url), "kind": "credentials", "value": cred}
        )
    return rows


# ---- negatives: look-alikes --------------------------------------------------------------------
MONTHS = ["January", "March", "June", "September", "December"]


def luhn_ok(d: str) -> bool:
    s = 0
    for i, ch in enumerate(reversed(d)):
        x = int(ch) * (2 if i % 2 else 1)
        s += x - 9 if x > 9 else x
    return s % 10 == 0


def negatives():
    r = rng.randrange
    cats: dict[str, list[str]] = {
        "date": [
            f"The meeting moved to {r(2000, 2030)}-{r(1, 13):02d}-{r(1, 29):02d}." for _ in range(8)
        ]
        + [f"Born {r(1, 29):02d}/{r(1, 13):02d}/{r(1950, 2010)} in Leeds." for _ in range(6)]
        + [
            f"Due {pick(MONTHS)} {r(1, 29)}, {r(1990, 2030)} at {r(0, 24):02d}:{r(0, 60):02d}."
            for _ in range(6)
        ]
        + [
            f"Timestamp {r(2000, 2030)}-{r(1, 13):02d}-{r(1, 29):02d}T{r(0, 24):02d}:{r(0, 60):02d}:{r(0, 60):02d}Z logged."
            for _ in range(6)
        ],
        "time": [
            f"Lap time {r(0, 60):02d}:{r(0, 60):02d}:{r(0, 60):02d}.{r(0, 1000):03d}"
            for _ in range(6)
        ]
        + [f"unix time {r(1_000_000_000, 1_999_999_999)} in the log" for _ in range(8)],
        "version": [
            f"Upgrade to version {r(0, 20)}.{r(0, 30)}.{r(0, 100)}.{r(0, 300)} today."
            for _ in range(8)
        ]
        + [
            f"Requires v{r(1, 12)}.{r(0, 30)}.{r(0, 20)} or later; tested on {r(1, 5)}.{r(0, 9)}.{r(0, 9)}."
            for _ in range(8)
        ]
        + [f"Windows build 10.0.{r(10000, 30000)}.{r(0, 5000)} shipped." for _ in range(6)]
        + [f"pip install lodash@{r(1, 5)}.{r(0, 20)}.{r(0, 30)} then rerun" for _ in range(4)],
        "price": [f"It costs ${r(1, 99)},{r(100, 999)}.{r(0, 99):02d} plus tax." for _ in range(8)]
        + [
            f"Total: EUR {r(100, 9999)},{r(0, 99):02d} (was {r(1, 99)} {r(100, 999)},00)"
            for _ in range(6)
        ]
        + [
            f"Revenue grew to 1,{r(100, 999)},{r(100, 999)},{r(100, 999)} dollars."
            for _ in range(6)
        ],
        "isbn": [f"ISBN 978-{r(0, 2)}-{r(100, 999)}-{r(10000, 99999)}-{r(0, 10)}" for _ in range(8)]
        + [
            f"see ISBN 0-{r(100, 999)}-{r(10000, 99999)}-{r(0, 10)} p. {r(1, 400)}"
            for _ in range(8)
        ],
        "order": [
            f"Order #{r(100, 999)}-{r(1000000, 9999999)}-{r(1000000, 9999999)} shipped."
            for _ in range(8)
        ]
        + [f"Invoice INV-{r(2015, 2030)}-{r(0, 99999):05d} is overdue." for _ in range(6)]
        + [f"Tracking 1Z{rand(UPNUM, 16)} and ref {r(10_000_000, 99_999_999)}" for _ in range(6)]
        + [
            f"Part no. {r(1000, 9999)}-{r(100, 999)}-{r(10, 99)}, ZIP {r(10000, 99999)}-{r(1000, 9999)}."
            for _ in range(6)
        ],
        "hash": [f"Fixed in commit {rand(HEX, 40)} by the bot." for _ in range(6)]
        + [f"md5 {rand(HEX, 32)} matches; short sha {rand(HEX, 7)}." for _ in range(6)]
        + [f"sha256:{rand(HEX, 64)} is the digest." for _ in range(6)]
        + [
            f"Request id {rand(HEX, 8)}-{rand(HEX, 4)}-{rand(HEX, 4)}-{rand(HEX, 4)}-{rand(HEX, 12)} failed."
            for _ in range(6)
        ],
        "number": [
            f"The population was {r(1_000_000, 9_999_999)} in {r(1900, 2020)}." for _ in range(6)
        ]
        + [
            f"Coordinates {r(-89, 89)}.{r(0, 9999):04d}, {r(-179, 179)}.{r(0, 9999):04d}"
            for _ in range(6)
        ]
        + [
            f"pi is about 3.{r(10**8, 10**9)}, Genesis {r(1, 50)}:{r(1, 30)}, ratio {r(1, 9)}:{r(1, 9)}"
            for _ in range(6)
        ]
        + [f"Score was {r(0, 200)}-{r(0, 200)} after {r(0, 9)} overtimes" for _ in range(4)],
        "mac": [
            ":".join(rand("0123456789ABCDEF", 2) for _ in range(6)) + " is the NIC's MAC"
            for _ in range(6)
        ],
        "code": [
            "Call std::vector<int>::size() here.",
            "use std::io::Read; fn main() {}",
            "Foo::bar and a::b are paths",
            "the ratio 1::2 in the score",
            "Risk-free rate and task-manager ideas",
            "sk-learn is not how scikit-learn is spelled",
            "Mask ghp_ prefixes in logs, e.g. ghp_xxx",
            "AKIA is the AWS prefix for long-term keys",
            "xoxb- tokens are for bots",
            "icon@2x.png and logo@3x.webp in assets",
            "mention @someone in the channel",
            "rating 4.5/5 from 1,234 reviews",
            "-----BEGIN CERTIFICATE----- is public",
            "https://example.com:8080/path?q=1 has no credentials",
            "http://localhost:3000/users/@me is a route",
        ],
        "card_like": [],
        "iban_like": [],
        "ssn_like": [],
    }
    while len(cats["card_like"]) < 16:  # 16 digits in card grouping, failing the Luhn check
        d = pick(["4", "5", "3", "6"]) + rand(string.digits, 15)
        if not luhn_ok(d):
            cats["card_like"].append(
                f"Account {' '.join(d[i : i + 4] for i in range(0, 16, 4))} on file."
            )
    for i in range(12):  # IBAN shapes with a wrong check
        country = list(IBAN_SHAPES)[i % len(IBAN_SHAPES)]
        good = iban_check(country, "".join(pick(string.digits) for _ in IBAN_SHAPES[country]))
        bad = good[:2] + f"{(int(good[2:4]) + 1 + r(0, 50)) % 97 + 2:02d}" + good[4:]
        if bad[2:4] != good[2:4]:
            cats["iban_like"].append(f"Reference {bad} on the slip.")
    for _ in range(12):  # SSN shapes the SSA never issues
        area = pick(["000", "666", f"9{r(0, 100):02d}"])
        cats["ssn_like"].append(f"Test id {area}-{r(1, 100):02d}-{r(1, 10000):04d} in the fixture.")
    rows = []
    for cat, texts in cats.items():
        rows += [{"text": t, "kind": None, "value": None, "lookalike": cat} for t in texts]
    return rows


def render() -> str:
    """The whole file's text (the generator is seeded: same text every run)."""
    global rng
    rng = random.Random(15)
    rows = positives() + negatives()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    OUT.write_text(render(), encoding="utf-8")
    rows = [json.loads(line) for line in OUT.read_text(encoding="utf-8").splitlines()]
    pos = sum(r["kind"] is not None for r in rows)
    print(f"wrote {OUT}: {pos} positives, {len(rows) - pos} negatives")


if __name__ == "__main__":
    main()
