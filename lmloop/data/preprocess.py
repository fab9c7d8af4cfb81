"""Preprocessing steps, each a function over a batch of documents with its state passed in.

The data stage chains them: `clean_batch` (Unicode NFC, control characters, whitespace, length
limits) -> `lmloop.data.pii.scrub_batch` (optional) -> `exact_dedup` (hash of normalized text) ->
`NearDedup.filter` (MinHash LSH) -> `assign_split` (deterministic, by document hash) -> `is_contaminated` (long
n-gram overlap with the evaluation split, as in GPT-3, Brown et al. 2020, appendix C).
No step keeps hidden global state: whatever a step remembers (the hashes seen, the LSH index)
is an object the caller owns, so the same steps could run per partition on Ray Data or Spark.
This module never imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
import zlib
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmloop.errors import UserError
from lmloop.tokenizer import SPECIAL_TOKENS

# C0/C1 control characters except tab and newline; zero-width and BOM characters too.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_UNICODE_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_WORDS = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """NFC, line endings to \\n, control characters out, odd spaces to ' ', tidy blank lines.

    Each rewrite runs only when a cheap substring test says it has work to do: the regexes cost
    more than tokenization would leave room for on typical (ASCII, already tidy) text.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    ascii_only = text.isascii()
    if not ascii_only:
        text = unicodedata.normalize("NFC", text)
        text = _UNICODE_SPACE.sub(" ", text)
    text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:  # per-line rstrip: ~3x faster than a [ \t]+\n regex
        text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    while "\n\n\n" in text:  # str.replace is far faster than a \n{3,} regex here
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def clean_batch(
    texts: Iterable[str], *, min_chars: int = 1, max_chars: int = 0
) -> tuple[list[str], dict[str, int]]:
    """Normalize each text; drop empty, too-short and (when max_chars > 0) too-long ones."""
    kept: list[str] = []
    counts = {"empty": 0, "too_short": 0, "too_long": 0}
    for raw in texts:
        text = normalize_text(raw)
        if not text:
            counts["empty"] += 1
        elif len(text) < min_chars:
            counts["too_short"] += 1
        elif max_chars and len(text) > max_chars:
            counts["too_long"] += 1
        else:
            kept.append(text)
    return kept, counts


# ---- exact and near duplicates ---------------------------------------------------------------
_WHITESPACE = b" \t\n\r\x0b\x0c"


def doc_key(text: str) -> bytes:
    """16-byte hash of the text, lowercased, without ASCII whitespace (the dedup identity).

    Dropping whitespace (rather than collapsing runs) is one C call instead of a regex pass.
    """
    data = text.lower().encode("utf-8").translate(None, _WHITESPACE)
    return hashlib.blake2b(data, digest_size=16).digest()


def exact_dedup(keys: list[bytes], seen: set[bytes]) -> tuple[list[int], int]:
    """Indices of first occurrences (updating `seen`), and how many duplicates were dropped."""
    kept = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            kept.append(i)
    return kept, len(keys) - len(kept)


class WordHashes(dict):
    """word -> crc32, filled on first use (crc32: the same in every process, unlike `hash()`)."""

    def __missing__(self, word: str) -> int:
        if len(self) >= 200_000:  # bound the memory (~30 MB); values depend on the word only
            self.clear()
        value = self[word] = zlib.crc32(word.encode())
        return value


def ngram_hashes(text: str, n: int = 13, cache: WordHashes | None = None) -> np.ndarray:
    """Sorted unique 64-bit hashes of the word n-grams of the lowercased text (uint64 array).

    Each word is hashed once (through `cache`), then each n-gram's hash is a fixed polynomial
    mix of its words' hashes, computed with numpy. A text shorter than n words has none.
    """
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    cache = WordHashes() if cache is None else cache
    wh = np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    m = len(wh) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps mod 2**64 on purpose
        h = h * np.uint64(0x9E3779B97F4A7C15) + wh[k : k + m]
    return sorted_unique(h)


def sorted_unique(h: np.ndarray) -> np.ndarray:
    """np.unique by sorting (np.unique's hash-based path is ~15x slower here, numpy 2.4)."""
    h = np.sort(h)
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if len(h) else h


def shingle_hashes(text: str, n: int = 5, cache: WordHashes | None = None) -> np.ndarray:
    """32-bit hashes of the word n-grams (the text itself is one shingle when shorter)."""
    h = ngram_hashes(text, n, cache)
    if not len(h):
        h = np.array([zlib.crc32(" ".join(_WORDS.findall(text.lower())).encode())], np.uint64)
        return h
    return sorted_unique(h >> np.uint64(32))


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimizing false positives + false negatives around `threshold`
    (the weighting datasketch's MinHashLSH uses; 0.8 with 128 permutations gives (9, 13))."""

    def integral(f, lo: float, hi: float) -> float:
        x = np.linspace(lo, hi, 201)
        y = f(x)
        return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())

    best, params = float("inf"), (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = integral(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn = integral(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0)
            if fp + fn < best:
                best, params = fp + fn, (b, r)
    return params


class NearDedup:
    """MinHash LSH near-duplicate filter; the band index is this object's state.

    A document is dropped when it shares a whole LSH band with an earlier kept document, i.e.
    when its estimated Jaccard similarity of word 5-gram sets is around `threshold` or more
    (Broder 1997; the recipe of Lee et al. 2022). Signatures are computed with numpy in bounded
    chunks (datasketch's `update_batch` builds one shingles x permutations matrix, gigabytes for
    a book). The index keeps one 64-bit hash per band per document in a set: ~1 KB a document
    (measured), against ~3.7 KB for datasketch's MinHashLSH, which also keeps each band's bytes
    per key. So it grows with the number of documents: past ~10M, run it as its own job.
    """

    _CHUNK = 8192

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        self.num_perm, self.ngram = num_perm, ngram
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.RandomState(seed)
        # multiply-shift hashing (Dietzfelbinger et al. 1997): h -> high 32 bits of (a*h + b)
        # mod 2**64 with odd a; no modulo, so a signature costs 4 cheap numpy passes
        self._a = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self._b = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64)
        self._mix = rng.randint(0, 1 << 63, size=self.rows, dtype=np.uint64) | np.uint64(1)
        self._words = WordHashes()
        self._index: list[set[int]] = [set() for _ in range(self.bands)]

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature: per permutation, the minimum permuted shingle hash."""
        hv = shingle_hashes(text, self.ngram, self._words)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(hv), self._CHUNK):
            perm = hv[i : i + self._CHUNK, None] * self._a  # (n, num_perm), wraps mod 2**64
            perm += self._b
            perm >>= np.uint64(32)
            np.minimum(sig, perm.min(axis=0), out=sig)
        return sig

    def band_keys(self, sig: np.ndarray) -> list[int]:
        """One 64-bit hash per band of the signature (uint64 arithmetic wraps on purpose)."""
        bands = sig[: self.bands * self.rows].reshape(self.bands, self.rows)
        return (bands * self._mix).sum(axis=1, dtype=np.uint64).tolist()

    def filter(self, texts: list[str]) -> tuple[list[int], int]:
        """Indices of texts kept (each kept one joins the index) and the number dropped."""
        kept = []
        for i, text in enumerate(texts):
            keys = self.band_keys(self.signature(text))
            if any(k in band for k, band in zip(keys, self._index)):
                continue
            for k, band in zip(keys, self._index):
                band.add(k)
            kept.append(i)
        return kept, len(texts) - len(kept)


# ---- split, mixing, decontamination ----------------------------------------------------------
def _unit(key: bytes, start: int) -> float:
    return int.from_bytes(key[start : start + 7], "little") / float(1 << 56)


def assign_split(key: bytes, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' from the document hash: stable across runs and re-collections."""
    u = _unit(key, 0)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def copies(key: bytes, weight: float) -> int:
    """How many times a training document is used under a source weight (deterministic)."""
    whole = int(weight)
    return whole + (1 if _unit(key, 8) < weight - whole else 0)


def is_contaminated(
    text: str, eval_ngrams: np.ndarray, n: int = 13, cache: WordHashes | None = None
) -> bool:
    """True when the text shares any word n-gram with the evaluation data.

    `eval_ngrams` is the sorted unique array `ngram_hashes` gives for the evaluation texts
    (8 bytes per n-gram, far less than a Python set).
    """
    if not len(eval_ngrams):
        return False
    h = ngram_hashes(text, n, cache)
    if not len(h):
        return False
    pos = np.searchsorted(eval_ngrams, h)
    pos[pos == len(eval_ngrams)] = 0
    return bool((eval_ngrams[pos] == h).any())


# ---- tokenizer training ----------------------------------------------------------------------
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus lmloop's special tokens
MAX_VOCAB = 1 << 20


def check_vocab_size(n: int) -> None:
    """UserError unless a byte-level BPE of `n` tokens makes sense."""
    if not MIN_VOCAB <= n <= MAX_VOCAB:
        raise UserError(
            f"vocab_size {n} is out of range: expected {MIN_VOCAB}..{MAX_VOCAB:,}",
            hint=f"a byte-level BPE needs 256 bytes + {len(SPECIAL_TOKENS)} special tokens; "
            "4096-65536 is usual",
        )


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Backend:
    """A byte-level BPE (GPT-2 style) trained on `texts`, with lmloop's special tokens.

    Returns the `tokenizers.Tokenizer` (save it through `lmloop.tokenizer.Tokenizer`). Texts are
    streamed to the trainer in batches; only `tokenizers` is imported (no transformers, no torch).
    """
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    it = iter(texts)  # streamed in lists of up to 256 texts
    backend.train_from_iterator(iter(lambda: list(itertools.islice(it, 256)), []), trainer=trainer)
    return backend
