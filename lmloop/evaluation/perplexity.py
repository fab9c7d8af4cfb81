"""Perplexity under a stated protocol: the scoring core of `lmloop eval`, the loop's gate and train.

The figures and protocols are lm-evaluation-harness's and Hugging Face's (docs/eval.md); words
and bytes are counted on the *original* text, before any detokenization. Windowing (`window` =
tokens per forward pass, at most the model's context), on the token list prefixed by BOS (else
EOS):

- disjoint (`stride=None`): lm-eval's rolling loglikelihood: each window predicts the next
  `window` tokens conditioned on the one token before them; the last, shorter window is
  right-aligned so it sees a full window of context (`get_rolling_token_windows` after
  `make_disjoint_window`, context_len=1).
- sliding (`stride=S`): windows start every S tokens, each scores only the tokens the previous
  one did not. With S == window this is HF's disjoint variant, which leaves the first token of
  every window after the first unscored (the report's token count says so).
- `documents=True`: each document is its own sequence (lm-eval's `wikitext` protocol); else
  documents are joined by EOS into one stream.

Windows are batched right-padded, and the output head runs only on the scored positions, in row
chunks, so a 49k vocabulary at 8k tokens never needs a full logits tensor (`_HeadTap`)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lmloop.engine.fast import PackedLinear
from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.models.base import DEFAULT_BATCH_TOKENS

if TYPE_CHECKING:
    from lmloop.models.io import LoadedModel
    from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ---- text normalisation and counts (lm-eval's definitions) -----------------------------------
_WIKITEXT_RULES: list[tuple[str, str, bool]] = [
    # (pattern, replacement, is_regex): WikiText's tokenized punctuation glued back, in the
    # order lm-eval's `wikitext` task applies it; the order matters ("= = =" before "= =").
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (`@-@`, spaced punctuation) as lm-eval's task does."""
    for pattern, repl, is_regex in _WIKITEXT_RULES:
        text = re.sub(pattern, repl, text) if is_regex else text.replace(pattern, repl)
    return text


def count_words(text: str) -> int:
    """lm-eval's word count: pieces of a whitespace split (leading/trailing space counts one)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


# ---- windows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Feed `inputs` to the model; its last `len(targets)` logits predict `targets`."""

    doc: int
    inputs: list[int]
    targets: list[int]


def rolling_windows(tokens: Sequence[int], prefix: int, window: int, doc: int = 0) -> list[Window]:
    """lm-eval's disjoint rolling windows (context_len=1) over `tokens`, first one from `prefix`."""
    toks = list(tokens)
    n = len(toks)
    if n == 0:
        return []
    first = min(window, n)
    out = [Window(doc, [prefix, *toks[: first - 1]], toks[:first])]
    done = first
    while done < n:
        k = min(n - done, window)
        end = done + k
        # lm-eval keeps `window` tokens ending just before `end` as input; the targets are the
        # last k of the (context + targets) sequence, so the last short window sees full context.
        out.append(Window(doc, toks[end - window - 1 : end - 1], toks[end - k : end]))
        done = end
    return out


def strided_windows(
    tokens: Sequence[int], prefix: int, window: int, stride: int, doc: int = 0
) -> list[Window]:
    """The Hugging Face fixed-length-model loop over `[prefix] + tokens`."""
    seq = [prefix, *tokens]
    n = len(seq)
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        # HF feeds seq[begin:end] and scores its last trg_len labels, except the window's first
        # position (no logit predicts it). The last logit predicts nothing, so feed one less.
        start = max(begin + 1, end - trg_len)
        if end > start:
            out.append(Window(doc, seq[begin : end - 1], seq[start:end]))
        prev_end = end
        if end == n:
            break
    return out


def make_windows(
    docs: Sequence[Sequence[int]],
    *,
    prefix: int,
    window: int,
    stride: int | None,
    documents: bool,
    joiner: int | None,
) -> list[Window]:
    """All windows of a protocol. In stream mode the documents are joined by `joiner` (EOS)."""
    if documents:
        seqs = [list(d) for d in docs]
    else:
        stream: list[int] = []
        for i, d in enumerate(docs):
            if i and joiner is not None:
                stream.append(joiner)
            stream.extend(d)
        seqs = [stream]
    out: list[Window] = []
    for i, s in enumerate(seqs):
        if stride is None:
            out += rolling_windows(s, prefix, window, doc=i)
        else:
            out += strided_windows(s, prefix, window, stride, doc=i)
    return out


# ---- scoring -----------------------------------------------------------------------------------
def _batches(windows: list[Window], batch_tokens: int, batch_size: int | None) -> list[list[int]]:
    """Group window indices by similar length (longest first) under a token budget.

    A window shorter than 90% of its batch's widest starts a new batch: padding is computed
    like real tokens, and on a CPU a longer batch buys little once a window has a few hundred
    tokens, so wasted padding would cost more than the batching saves.
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = len(windows[cur[0]].inputs) if cur else len(windows[i].inputs)
        cap = batch_size or max(1, batch_tokens // max(width, 1))
        ragged = batch_size is None and len(windows[i].inputs) < 0.9 * width
        if cur and (len(cur) >= cap or ragged):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class _HeadTap:
    """Run the output head on the scored positions only, in chunks.

    A forward pre-hook on `model.lm_head` (both families and every converted model have one)
    takes the final hidden states, keeps the rows whose logits predict a target, and hands the
    head an empty input; we then apply the head to those rows chunk by chunk. So an 8k window
    over a 49k vocabulary never materializes its 1.6 GB logits tensor, and positions that only
    serve as context (sliding windows, the right-aligned last window) cost no head compute.
    The hook acts only in the thread that installed it, and only while `select` is armed.
    """

    def __init__(self, model: torch.nn.Module):
        head = getattr(model, "lm_head", None)
        self.head = head if isinstance(head, torch.nn.Linear) else None
        self.owner = threading.get_ident()
        self.select: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hidden: torch.Tensor | None = None
        self._handle = None
        self._head_fn: torch.nn.Module | None = None

    def __enter__(self) -> _HeadTap:
        if self.head is not None:
            self._handle = self.head.register_forward_pre_hook(self._pre)
            packed = PackedLinear.pack(self.head)  # chunks of rows: packed is faster
            self._head_fn = packed if packed is not self.head else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _pre(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
        if self.select is None or threading.get_ident() != self.owner:
            return None
        rows, pos = self.select
        self.select = None
        self.hidden = args[0][rows, pos]  # (N, C)
        return (args[0][:0, :0],)  # (0, C): the head computes nothing

    def logits(self, out: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, sl: slice):
        """Logits (n, V) of the selected positions `sl`, from the tap or the full output."""
        if self.hidden is not None:
            if self._head_fn is not None:
                return self._head_fn(self.hidden[sl])
            return F.linear(self.hidden[sl], self.head.weight, self.head.bias)
        return out[rows[sl], pos[sl]]


@contextlib.contextmanager
def _packed_linears(model: torch.nn.Module):
    """Swap the model's fp32 CPU linears for oneDNN pre-packed ones while scoring.

    Scoring is prefill only (hundreds to thousands of rows per matmul), where the packed layout
    is ~1.5x faster than the stock sgemm on this project's CPU (see lmloop.engine.fast). The
    same weights, so figures move by float rounding only (tested against the reference loops).
    The output head is left in place: `_HeadTap` packs its own copy."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    head = getattr(model, "lm_head", None)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear and child is not head:
                packed = PackedLinear.pack(child)  # the linear itself unless fp32 on the CPU
                if packed is not child:
                    mod._modules[name] = packed
                    swapped.append((mod, name, child))
    try:
        yield
    finally:
        for mod, name, child in swapped:
            mod._modules[name] = child


@torch.inference_mode()
def score_windows(
    model: torch.nn.Module,
    windows: list[Window],
    n_docs: int,
    *,
    batch_size: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    show_progress: bool = True,
    loss_chunk: int = 2048,
) -> tuple[list[float], list[int]]:
    """Run every window through `model`: per document, the summed log-likelihood of its targets
    (natural log, <= 0) and how many targets it has."""
    device = next(model.parameters()).device
    loglik = [0.0] * n_docs
    counts = [0] * n_docs
    batches = _batches(windows, batch_tokens, batch_size)
    it = progress(batches, total=len(batches), desc="eval", unit="batch", show=show_progress)
    with _packed_linears(model), _HeadTap(model) as tap:
        for batch in it:
            rows = [windows[i] for i in batch]
            width = max(len(w.inputs) for w in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            # Per row, the positions whose logits predict that row's targets.
            row_idx, pos_idx, tgt = [], [], []
            for r, w in enumerate(rows):
                ids[r, : len(w.inputs)] = torch.tensor(w.inputs, dtype=torch.long)
                t, k = len(w.inputs), len(w.targets)
                row_idx += [r] * k
                pos_idx += range(t - k, t)
                tgt += w.targets
            row_t = torch.tensor(row_idx, device=device)
            pos_t = torch.tensor(pos_idx, device=device)
            tgt_t = torch.tensor(tgt, device=device)
            tap.select, tap.hidden = (row_t, pos_t), None
            # Right padding is invisible to the real positions of a causal model.
            out = model(ids.to(device))
            tap.select = None
            nll = torch.empty(len(tgt), dtype=torch.float64)
            for s in range(0, len(tgt), loss_chunk):
                sl = slice(s, s + loss_chunk)
                chunk = tap.logits(out, row_t, pos_t, sl).float()  # (n, V)
                nll[sl] = F.cross_entropy(chunk, tgt_t[sl], reduction="none").double().cpu()
            del out
            tap.hidden = None
            start = 0
            for w in rows:
                k = len(w.targets)
                loglik[w.doc] -= float(nll[start : start + k].sum())
                counts[w.doc] += k
                start += k
    return loglik, counts


# ---- checks ------------------------------------------------------------------------------------
def check_protocol(
    model: torch.nn.Module, tokenizer: Tokenizer, window: int | None, stride: int | None
) -> int:
    """Validate window/stride and the tokenizer against the model; return the window to use."""
    ctx = int(model.max_seq_len)
    w = ctx if window is None else int(window)
    if w < 2:
        raise UserError(f"window {w} is too short: expected at least 2 tokens")
    if w > ctx:
        raise UserError(
            f"window {w} is longer than the model's context of {ctx} tokens",
            hint=f"pass --window {ctx} or less",
        )
    if stride is not None:
        if stride < 1:
            raise UserError(f"stride {stride} must be a positive number of tokens")
        if stride > w:
            raise UserError(
                f"stride {stride} is larger than the window {w}: tokens between windows "
                "would never be scored",
                hint=f"pass --stride {w} or less, or omit --stride for disjoint windows",
            )
    mv = int(model.config.vocab_size)
    if tokenizer.vocab_size > mv:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {mv}: "
            "this tokenizer does not belong to this model",
            hint="evaluate with the tokenizer saved beside the model",
        )
    return w


def prefix_token(tokenizer: Tokenizer) -> int:
    """lm-eval's prefix token: BOS when the tokenizer has one, else EOS."""
    tok = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tok is None:
        raise UserError(
            "the tokenizer has neither a BOS nor an EOS token to start a window from",
            hint="use a tokenizer with an end-of-text token",
        )
    return int(tok)


# ---- the public entry points -------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """Everything that changes the figures besides the model: reported beside them."""

    window: int
    stride: int | None
    documents: bool
    detokenize: str
    prefix_token_id: int
    joiner_token_id: int | None
    mode: str  # "disjoint" (lm-eval rolling) | "sliding" (HF strided)


def _exp(x: float) -> float:
    # An untrained model's word perplexity can exceed a float; say "inf" rather than crash.
    return math.exp(x) if x < 709.0 else math.inf


def figures(loglik: float, tokens: int, words: int, nbytes: int) -> dict[str, float | int | None]:
    nll = -loglik
    return {
        "token_perplexity": _exp(nll / tokens) if tokens else None,
        "word_perplexity": _exp(nll / words) if words else None,
        "byte_perplexity": _exp(nll / nbytes) if nbytes else None,
        "bits_per_byte": nll / nbytes / math.log(2) if nbytes else None,
        "nll_per_token": nll / tokens if tokens else None,
        "loglikelihood": loglik,
    }


def evaluate_tokens(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    docs: Sequence[Sequence[int]],
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    documents: bool = False,
    detokenize: str = "none",
    batch_size: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score pre-tokenized documents; `texts` are their original texts (for words and bytes)."""
    w = check_protocol(model, tokenizer, window, stride)
    if not docs or not any(len(d) for d in docs):
        raise UserError("nothing to evaluate: the text is empty", hint="pass a non-empty text")
    mv = int(model.config.vocab_size)
    top = max(max(d) for d in docs if len(d))
    if top >= mv:
        raise UserError(
            f"token id {top} is outside the model's vocabulary of {mv}: the text was tokenized "
            "with a tokenizer that does not belong to this model",
            hint="re-tokenize with the model's tokenizer",
        )
    prefix = prefix_token(tokenizer)
    joiner = tokenizer.eos_id if tokenizer.eos_id is not None else prefix
    protocol = Protocol(
        window=w,
        stride=stride,
        documents=documents,
        detokenize=detokenize,
        prefix_token_id=prefix,
        joiner_token_id=None if documents else joiner,
        mode="disjoint" if stride is None else "sliding",
    )
    windows = make_windows(
        docs, prefix=prefix, window=w, stride=stride, documents=documents, joiner=joiner
    )
    n_seqs = len(docs) if documents else 1
    t0 = time.perf_counter()
    loglik, counts = score_windows(
        model, windows, n_seqs, batch_size=batch_size, show_progress=show_progress
    )
    seconds = time.perf_counter() - t0
    tokens = sum(counts)
    words = sum(count_words(t) for t in texts)
    nbytes = sum(count_bytes(t) for t in texts)
    fed = sum(len(x.inputs) for x in windows)
    out: dict[str, Any] = figures(math.fsum(loglik), tokens, words, nbytes)
    out["protocol"] = asdict(protocol)
    out["counts"] = {
        "documents": len(docs),
        "tokens": tokens,  # predicted (scored) tokens
        "tokens_fed": fed,  # tokens run through the model, context included
        "words": words,
        "bytes": nbytes,
        "windows": len(windows),
    }
    out["timing"] = {"seconds": seconds, "tokens_per_second": tokens / seconds}
    if documents:
        out["per_document_loglik"] = loglik
    return out


def evaluate_texts(
    loaded: LoadedModel,
    texts: Sequence[str],
    window: int | None = None,
    stride: int | None = None,
    documents: bool = False,
    *,
    detokenize: str = "none",
    batch_size: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Figures for `texts` under a protocol; `loaded` is a loaded model (model + tokenizer).

    Words and bytes are counted on `texts` as given; with `detokenize="wikitext"` the model
    scores the detokenized text (lm-eval's `wikitext` task), counts stay on the original.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("nothing to evaluate: the text is empty", hint="pass a non-empty text")
    if detokenize not in ("none", "wikitext"):
        raise UserError(f"unknown detokenize '{detokenize}': expected none or wikitext")
    scored = [wikitext_detokenize(t) for t in texts] if detokenize == "wikitext" else list(texts)
    tok = loaded.tokenizer
    docs = tok.encode_batch(scored)
    return evaluate_tokens(
        loaded.model,
        tok,
        docs,
        texts,
        window=window,
        stride=stride,
        documents=documents,
        detokenize=detokenize,
        batch_size=batch_size,
        show_progress=show_progress,
    )


# ---- sample generations ------------------------------------------------------------------------
@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 32
) -> str:
    """Greedy continuation over the model's KV cache (deterministic, for the report)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [prefix_token(tokenizer)]
    ctx = int(model.max_seq_len)
    ids = ids[-(ctx - 1) :]
    steps = max(0, min(max_new_tokens, ctx - len(ids)))
    if steps == 0:
        return ""
    device = next(model.parameters()).device
    cache = model.new_cache(1, len(ids) + steps)
    x = torch.tensor([ids], device=device)
    logits = model(x, positions=torch.arange(len(ids), device=device)[None], cache=cache)
    stop = tokenizer.stop_ids
    new: list[int] = []
    pos = len(ids)
    for _ in range(steps):
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        new.append(nxt)
        if len(new) == steps:
            break
        logits = model(
            torch.tensor([[nxt]], device=device), positions=torch.tensor([[pos]], device=device),
            cache=cache,
        )  # fmt: skip
        pos += 1
    return tokenizer.decode(new, skip_special_tokens=True)
