"""Batches for `lmloop train`: pretraining windows and supervised fine-tuning examples.

Both sources answer the same question: "give me samples i..j of the run as (input_ids, labels)",
with labels -100 where no loss is taken. A sample index maps to data by a pure function of
(seed, index): epoch `e = i // n` uses the permutation `default_rng(seed + e)`; so the position
in the data is just the number of samples consumed, a resumed run replays exactly the batches an
uninterrupted one would see, and under DDP each rank takes its slice of the same global batch
whatever the world size.

Pretraining windows are `seq_len + 1` tokens cut at multiples of `seq_len` from the memory-mapped
train split (documents are joined by EOS by the data stage). SFT records are JSONL lines with
`{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`; they are rendered with
the tokenizer's chat template one turn at a time, and only assistant turns (their text and the
end-of-turn marker) carry loss, as in InstructGPT-style SFT.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmloop.errors import UserError
from lmloop.tokenizer import Tokenizer

IGNORE = -100


class Permuted:
    """Sample index -> item index through per-epoch permutations of `n` items."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> int:
        epoch, k = divmod(i, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[k])


class PretrainData:
    """Windows of `seq_len + 1` tokens from a token array (`arr[i:j]` -> np.ndarray)."""

    def __init__(self, tokens: Any, seq_len: int, seed: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(
                f"the train split has {len(tokens)} tokens, fewer than one window of "
                f"seq_len+1 = {seq_len + 1}",
                hint="prepare more data or lower batch.seq_len",
            )
        self.index = Permuted(self.n_windows, seed)

    def batch(self, samples: range | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [self.index(i) * self.seq_len for i in samples]
        rows = [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        chunk = torch.from_numpy(np.stack(rows))
        return chunk[:, :-1], chunk[:, 1:]


def val_windows(tokens: Any, seq_len: int, max_windows: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping validation windows (the last may be shorter)."""
    starts = range(0, len(tokens) - 1, seq_len)[: max(0, max_windows)]  # each window >= 2 tokens
    return [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad (ids, labels) rows; padding is at the end so causal attention never sees it."""
    width = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        x[r, : len(ids)] = torch.tensor(ids)
        y[r, : len(labels)] = torch.tensor(labels)
    return x, y


# ---- supervised fine-tuning -------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) for every non-empty line of a JSONL file (or item of a JSON list)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}", hint="pass a .jsonl of records")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{p}:{i}", r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{p}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{n} is not valid JSON: {e.msg}") from None
    if not out:
        raise UserError(f"{p} holds no records", hint="one JSON record per line")
    return out


def read_sft_records(path: str | Path) -> list[list[dict[str, str]] | str]:
    """Chat / prompt-completion records as message lists; {"text"} records as strings."""
    return [_record_messages(rec, where) for where, rec in read_jsonl(path)]


def _record_messages(rec: Any, where: str) -> list[dict[str, str]] | str:
    expected = (
        'expected {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} or {"text"}'
    )
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise UserError(f"{where}: malformed messages", hint=expected)
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: no assistant message to learn from", hint=expected)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(rec.get("text"), str) and "messages" not in rec:
        return rec["text"]  # replayed plain text: loss on every token
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["completion"]},
        ]
    raise UserError(f"{where}: unknown record keys {sorted(rec)}", hint=expected)


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], last_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; loss only on assistant turns (or the last one).

    Each turn is rendered through the chat template and encoded separately, the way the serving
    engine sees it: the prompt (ending with the generation prompt) is encoded as text, the reply
    is what the model produces token by token after it.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant" and (k == last or not last_only):
            prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise UserError("the tokenizer's chat template does not render turn by turn")
            head = tokenizer.encode(prompt[len(done) :])
            reply = tokenizer.encode(full[len(prompt) :])
            ids += head + reply
            labels += [IGNORE] * len(head) + reply
            done = full
    return ids, labels


def encode_text(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """A plain-text record (replayed pretraining text): loss on every token, EOS-terminated."""
    ids = tokenizer.encode(text)
    if tokenizer.eos_id is not None:
        ids = ids + [int(tokenizer.eos_id)]
    return ids, list(ids)


class SFTData:
    """Tokenized conversations; `batch(samples)` pads a batch of them."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int, seed: int):
        if not examples:
            raise UserError("no SFT examples left after tokenization")
        self.examples, self.pad_id = examples, pad_id
        self.index = Permuted(len(examples), seed)

    @classmethod
    def from_records(
        cls, records, tokenizer: Tokenizer, seq_len: int, seed: int, last_only: bool = False
    ) -> SFTData:
        examples = tokenize_records(records, tokenizer, seq_len, last_only)
        return cls(examples, pad_id_of(tokenizer), seed)

    def batch(self, samples: range | list[int]):
        return pad_rows([self.examples[self.index(i)] for i in samples], self.pad_id)


def pad_id_of(tokenizer: Tokenizer) -> int:
    return int(next((t for t in (tokenizer.pad_id, tokenizer.eos_id) if t is not None), 0))


def tokenize_records(
    records, tokenizer: Tokenizer, seq_len: int, last_only: bool = False
) -> list[tuple[list[int], list[int]]]:
    """Encode and shift each record: inputs ids[:-1], targets labels[1:], cut to seq_len."""
    out = []
    for rec in records:
        if isinstance(rec, str):
            ids, labels = encode_text(tokenizer, rec)
        else:
            ids, labels = encode_chat(tokenizer, rec, last_only)
        x, y = ids[:-1][:seq_len], labels[1:][:seq_len]
        if any(t != IGNORE for t in y):  # a reply cut off entirely by seq_len teaches nothing
            out.append((x, y))
    return out


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/val split of records (at least one val record when there are 2+)."""
    if len(records) < 2 or val_fraction <= 0:
        return list(records), []
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, int(math.floor(len(records) * val_fraction)))
    val_idx = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def completion_bytes(examples, tokenizer: Tokenizer) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the loss-bearing tokens, for bits per byte."""
    nbytes = ntok = 0
    for _, y in examples:
        kept = [t for t in y if t != IGNORE]
        ntok += len(kept)
        nbytes += len(tokenizer.decode(kept).encode("utf-8"))
    return nbytes, ntok
