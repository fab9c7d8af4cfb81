"""Shared helpers for the server tests: a tiny real model on disk and a real `lmloop serve`.

Holds no tests itself. The model is lmloop's own Llama family at toy size (hidden 32, 2 layers)
with a byte-level BPE tokenizer trained here on a few sentences, saved with
`lmloop.models.io.save_model`, so the server loads and runs it exactly as it would a real one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Hello! How are you today? I am fine, thank you.",
    "Feedback from users becomes training data for the next version.",
    "Numbers like 12345 and words like café, naïve, and 東京 appear too.",
] * 20


def make_tiny_model(directory: Path, *, seed: int = 0, max_len: int = 2048) -> Path:
    """A tiny Llama-family model folder (random weights, real tokenizer); returns its path."""
    import torch
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmloop.models import build_model
    from lmloop.models.io import save_model
    from lmloop.models.llama import LlamaConfig
    from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXT, trainer)
    tok = Tokenizer.from_backend(backend)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        eos_token_id=tok.eos_id,
    )
    model = build_model(cfg).eval()
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, model, tok)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lmloop.cli serve ...` in a subprocess, ready when /health answers 200."""

    def __init__(
        self, model: Path | str | None, tmp: Path, *extra: str, api_key: str | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "feedback.db"
        self.api_key = api_key
        self.log = open(tmp / f"server-{self.port}.log", "w")  # noqa: SIM115
        args = [sys.executable, "-m", "lmloop.cli", "serve"]
        args += [] if model is None else ["--model", str(model)]  # None: `--upstream` alone
        args += ["--port", str(self.port), "--db", str(self.db), *extra]
        if api_key:
            args += ["--api-key", api_key]
        env = {**os.environ, "LMLOOP_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
        env.pop("LMLOOP_API_KEY", None)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.log_path = tmp / f"server-{self.port}.log"
        self.health_seen: list[tuple[int, str]] = []  # /health answers while waiting

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                self.health_seen.append((r.status_code, r.json().get("status")))
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def decision_lineage(
    wins: int, ties: int, losses: int, interval: tuple[float, float],
    degenerate: tuple[float, float], base_ppl: tuple[float, float],
) -> dict:  # fmt: skip
    """A lineage as `lmloop loop` registers a version its gate passed, with the figures'
    shapes `lmloop.loop.gate` and `lmloop.loop.judge` write (win rate: 1 per win, 1/2 per tie)."""
    n = wins + ties + losses

    def degen(share: float) -> dict:
        k = round(share * n)
        return {"n": n, "counts": {"empty": k, "loop": 0, "cut off": 0}, "share": share}

    figures = {
        "current_base_ppl": base_ppl[0],
        "candidate_base_ppl": base_ppl[1],
        "judge": {
            "trained_on": {"pairs": 40, "thumbs": 0},
            "pairs": {"n": 12, "accuracy": 0.83, "interval": [0.6, 1.0], "votes": True},
            "thumbs": {},
            "clears_chance": True,
        },
        "answers": {
            "what": "held-out prompts",
            "n": n,
            "win": {
                "n": n,
                "win_rate": (wins + ties / 2) / n,
                "interval": list(interval),
                "confidence": 0.95,
                "wins": wins,
                "ties": ties,
                "losses": losses,
                "clears_half": interval[0] > 0.5,
            },  # fmt: skip
            "degenerate": {"current": degen(degenerate[0]), "candidate": degen(degenerate[1])},
        },
        "pairs": {"n": 12, "gain": 0.4, "gain_low": 0.1, "gain_high": 0.7},
        "rule": {},
    }
    return {
        "data": {"base": "2025-01-01T00:00:00Z", "feedback": {"dpo": 52}},
        "config": {"name": "tiny"},
        "decision": {"reason": "base-val perplexity ...; candidate wins ...", "figures": figures},
        "cycle": "runs/loop/cycle-1",
    }
