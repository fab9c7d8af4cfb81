"""PII detection and scrubbing: find personal data and secrets in text, replace them with tags.

`find_pii(text)` returns the spans found, `scrub_pii(text)` replaces each with its placeholder
(`[EMAIL]`, `[PHONE]`, ...) and counts them per kind; the data stage (`scrub_pii=true`) and
`lmloop feedback export` (on by default) both call it. The kinds and how each is told apart from
its look-alikes are in docs/data.md#pii and beside each pattern below. Names and street
addresses are out of scope (they need a named-entity model). Precision and recall per kind on
`tests/data/pii/` are measured by `bench/pii.py` (BENCHMARKS.md). This module never imports torch."""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

import phonenumbers

PII_KINDS = ("email", "phone", "card", "iban", "ssn", "ip", "credentials", "secret")
PII_PLACEHOLDERS = {k: f"[{k.upper()}]" for k in PII_KINDS}
PHONE_REGION = "US"  # how numbers written without a leading + are read


class PiiSpan(NamedTuple):
    kind: str
    start: int
    end: int


# ---- secrets ---------------------------------------------------------------------------------
_SECRET = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*\Z)"
    r"|(?<![\w-])(?:"
    r"sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
    r"|(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}"
    r"|xox[abposre]-[A-Za-z0-9-]{10,}"
    r"|AIza[A-Za-z0-9_-]{35}"
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,}|npm_[A-Za-z0-9]{36}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r")(?![\w-])"
)

# ---- URLs with credentials -------------------------------------------------------------------
# scheme://USER:PASSWORD@host: the userinfo group is what gets replaced.
_URL_CREDENTIALS = re.compile(
    r"\b[A-Za-z][A-Za-z0-9+.-]*://([^\s:/?#@\[\]]+:[^\s/?#@]*)@(?=[\w\[])"
)

# ---- e-mail ----------------------------------------------------------------------------------
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.([A-Za-z]{2,24})(?![\w-])"
)
# "TLDs" that are file extensions: icon@2x.png, logo@3x.webp are image names, not addresses.
_FILE_TLDS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif", "tiff", "pdf"}

# ---- IBAN ------------------------------------------------------------------------------------
_IBAN = re.compile(r"(?<![\w-])([A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?)(?![\w-])")
# Registered lengths (ISO 13616 / SWIFT IBAN registry).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """ISO 13616: registered length, then the mod-97 check over the rearranged digits."""
    s = iban.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(s[:2]) != len(s) or not s.isalnum():
        return False
    digits = "".join(str(int(ch, 36)) for ch in s[4:] + s[:4])
    return int(digits) % 97 == 1


# ---- payment cards ---------------------------------------------------------------------------
_CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")
# Issuer prefixes (IIN ranges): Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay, Maestro.
_CARD_PREFIX = re.compile(
    r"^(?:4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2(?:2[2-9]|[3-6]\d|7[01])\d{13}|2720\d{12}"
    r"|3[47]\d{13}|6(?:011|5\d\d|4[4-9]\d)\d{12,15}|3(?:0[0-5]|[689]\d)\d{11,16}"
    r"|35(?:2[89]|[3-8]\d)\d{12,15}|62\d{14,17}|(?:5[06-8]|6\d)\d{10,17})$"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(raw: str) -> bool:
    digits = re.sub(r"[ -]", "", raw)
    # separators, when present, must be consistent and group the digits the way cards are printed
    groups = [len(g) for g in re.split(r"[ -]", raw)]
    if len(groups) > 1 and (len(set(re.findall(r"[ -]", raw))) > 1 or groups[0] != 4):
        if groups not in ([4, 6, 5], [4, 6, 4]):  # Amex, Diners
            return False
    return bool(_CARD_PREFIX.match(digits)) and luhn_valid(digits)


# ---- US SSN ----------------------------------------------------------------------------------
_SSN = re.compile(r"(?<![\w.-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-]|[.,]\d)")


def _ssn_ok(m: re.Match) -> bool:
    area, group, serial = m.group(1), m.group(3), m.group(4)
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# ---- IP addresses ----------------------------------------------------------------------------
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}(?:\.[\d.]+)?")
_VERSION_BEFORE = re.compile(r"(?:\bv|version|release|build|firmware|sdk|api|rev)\s*$", re.I)


def _ip_spans(text: str) -> Iterable[tuple[int, int]]:
    # IPv6 first: `::ffff:10.0.0.1` is one address, not a prefix and an IPv4 one
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            s, e = m.span()
            # a trailing colon is punctuation ("at fe80::1: done"), unless the address ends in ::
            while e - s > 2 and text[e - 1] == ":" and text[e - 2] != ":":
                e -= 1
            if e < len(text) and (text[e].isalnum() or text[e] == "_"):
                continue
            try:
                ipaddress.IPv6Address(text[s:e])
            except ValueError:
                continue
            groups = [g for g in text[s:e].split(":") if g]
            # `a::b`, `1::2` parse, but two short groups are C++/Rust paths and ratios: a real
            # two-group address leads with a full hextet (fe80::1, 2001::7) or is ::1-style.
            if not groups or (len(groups) == 2 and len(groups[0]) < 4):
                continue
            yield s, e
    for m in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield m.span()


# ---- phones ----------------------------------------------------------------------------------
# A cheap screen: the libphonenumber matcher (most of the time on number-rich prose) runs only
# on text holding a "+digits" run or a 3-3-4 digit shape.
_MAYBE_PHONE = re.compile(r"\+ ?\d[\d ().-]{5,}\d|\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}")
# How North American numbers are written without a country code: 3-3-4 groups or 10 digits.
_NANP_SHAPE = re.compile(r"^(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-]?)\d{3}[ .-]?\d{4}$")


def _phone_spans(text: str) -> Iterable[tuple[int, int]]:
    if not _MAYBE_PHONE.search(text):
        return
    matcher = phonenumbers.PhoneNumberMatcher(
        text, PHONE_REGION, leniency=phonenumbers.Leniency.POSSIBLE
    )
    for m in matcher:
        raw, num, start = m.raw_string, m.number, m.start
        if raw.startswith("(") and ")" not in raw:  # "(+1 555 ...)": the matcher keeps the "("
            raw, start = raw[1:], start + 1
        national = str(num.national_number)
        nanp = num.country_code == 1 and len(national) == 10 and national[0] not in "01"
        if raw.startswith("+"):
            ok = phonenumbers.is_valid_number(num) or (nanp and _NANP_SHAPE.match(raw))
        else:
            ok = nanp and bool(_NANP_SHAPE.match(raw))
        if ok:
            yield start, m.end


# ---- all together ----------------------------------------------------------------------------


def _candidates(text: str) -> Iterable[PiiSpan]:
    """Every candidate span, most specific kind first (the order resolves overlaps)."""
    for m in _SECRET.finditer(text):
        yield PiiSpan("secret", *m.span())
    if "://" in text:
        for m in _URL_CREDENTIALS.finditer(text):
            yield PiiSpan("credentials", *m.span(1))
    if "@" in text:
        for m in _EMAIL.finditer(text):
            if m.group(1).lower() not in _FILE_TLDS:
                yield PiiSpan("email", *m.span())
    for m in _IBAN.finditer(text):
        if iban_valid(m.group(1)):
            yield PiiSpan("iban", *m.span(1))
    for s, e in _ip_spans(text):
        yield PiiSpan("ip", s, e)
    for m in _CARD.finditer(text):
        if _card_ok(m.group()):
            yield PiiSpan("card", *m.span())
    for m in _SSN.finditer(text):
        if _ssn_ok(m):
            yield PiiSpan("ssn", *m.span())
    for s, e in _phone_spans(text):
        yield PiiSpan("phone", s, e)


def find_pii(text: str) -> list[PiiSpan]:
    """The PII spans of `text`, sorted and non-overlapping (earlier kinds win overlaps)."""
    taken: list[PiiSpan] = []  # sorted by start, non-overlapping
    for span in _candidates(text):
        i = bisect.bisect(taken, span.start, key=lambda t: t.start)
        if (i == 0 or taken[i - 1].end <= span.start) and (
            i == len(taken) or span.end <= taken[i].start
        ):
            taken.insert(i, span)
    return taken


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace every PII span with its kind's placeholder; count each kind (all kinds keyed)."""
    counts = dict.fromkeys(PII_KINDS, 0)
    spans = find_pii(text)
    if not spans:
        return text, counts
    parts: list[str] = []
    pos = 0
    for span in spans:
        parts += [text[pos : span.start], PII_PLACEHOLDERS[span.kind]]
        counts[span.kind] += 1
        pos = span.end
    parts.append(text[pos:])
    return "".join(parts), counts


def scrub_batch(texts: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    out: list[str] = []
    total = dict.fromkeys(PII_KINDS, 0)
    for t in texts:
        t, c = scrub_pii(t)
        out.append(t)
        for k, v in c.items():
            total[k] += v
    return out, total
