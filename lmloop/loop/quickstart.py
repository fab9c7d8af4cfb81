"""The quickstart's pieces that are not stages: its workspace and what each step hands the next,
`lmloop serve` as a child process, the teacher's judgement of continuations, and what the
quickstart prints (`lmloop/stages/quickstart.py` runs the steps).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from lmloop.artifacts import cache_dir
from lmloop.data.config import DataResult
from lmloop.engine.core import load_engine
from lmloop.engine.params import SamplingParams
from lmloop.errors import UserError
from lmloop.loop.config import LoopResult, QuickstartConfig
from lmloop.loop.gate import judge_summary
from lmloop.loop.users import Exchange, complies
from lmloop.models.io import LoadedModel, load_model
from lmloop.registry import Registry

# ---- the workspace and what each step hands the next ---------------------------------------


@dataclass
class Workspace:
    """`out/`, with this run's own registry and feedback store under `out/home` (the caches
    stay the caller's)."""

    out: Path
    home: Path
    env: dict[str, str]
    registry: Registry


@dataclass
class Corpus:
    """The teacher's stories and the data stage's folder of them."""

    stories: list[str]
    report: dict[str, Any]  # the teacher's: cached, tokens, seconds, ...
    path: Path  # corpus.jsonl
    data: DataResult


@dataclass
class Student:
    """The model trained from scratch: its best checkpoint, registered as `stories`."""

    best: Path
    val_loss: float | None
    run_dir: Path


@dataclass
class Judged:
    report: dict[str, Any]  # test perplexities
    quality: dict[str, Any]  # the teacher's perplexity of continuations, repeated words
    eval_dir: Path


@dataclass
class Deployment:
    """The assistant served, and what the simulated users said to it."""

    server: ServeProcess
    v1: str
    base_dir: Path  # the gate's base corpus, in the assistant's tokens
    db: Path
    held: list[str]  # held-out topics
    before: list[tuple[str, str, str | None]]
    exchanges: list[Exchange]


@dataclass
class Cycle:
    result: LoopResult
    decision: dict[str, Any]
    after: list[tuple[str, str, str | None]]


def workspace(cfg: QuickstartConfig) -> Workspace:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"
    for name in ("stories", "assistant"):  # every run starts from the shipped model again
        if (home / "registry" / name).exists():
            shutil.rmtree(home / "registry" / name)
    # The child server keeps the caller's caches (the converted GGUF the teacher already loaded,
    # the built kernel): with `out/home/cache` it converted the shipped model again, ~20 s.
    env = {**os.environ, "LMLOOP_HOME": str(home), "LMLOOP_CACHE": str(cache_dir())}
    return Workspace(out, home, env, Registry(home / "registry"))


def say(step: str, text: str) -> None:
    """A step's heading."""
    print(f"\n== {step} {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`lmloop serve` in a child process, as a user would start it."""

    def __init__(self, model: str, port: int, db: Path, log_path: Path, env: dict[str, str]):
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # The engine at its defaults (`EngineSpec()`), as the loop's gate generates the held-out
        # answers, so a candidate is judged as it is then served (it was `--int8` here).
        cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--port", str(port),
               "--db", str(db), "registry_poll=1"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**env, "LMLOOP_NO_PROGRESS": "1"})  # fmt: skip
        self.log_path = log_path

    def wait_ready(self, timeout: float = 600.0) -> None:
        start = said = time.monotonic()
        while time.monotonic() < start + timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-600:]
                raise UserError(f"lmloop serve exited with {self.proc.returncode}: {tail.strip()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - said > 8:
                print(f"   ... loading the model ({time.monotonic() - start:.0f} s)", flush=True)
                said = time.monotonic()
            time.sleep(0.5)
        raise UserError(f"lmloop serve at {self.url} was not ready after {timeout:.0f} s")

    def version(self) -> str | None:
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0].get("model_version")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- the model trained from scratch, judged ----------------------------------------------------

_REPEAT = re.compile(r"\b(\w+)(?:\W+\1\b){2}", re.IGNORECASE)


def repeats_a_word(text: str) -> bool:
    """A word three times in a row ("little little little"), the telltale of a looping model."""
    return bool(_REPEAT.search(text))


def teacher_perplexity(loaded: LoadedModel, prompt: str, continuations: list[str]) -> float:
    """The teacher's perplexity of continuations (their tokens only, given the prompt)."""
    nll, n = 0.0, 0
    tok, model = loaded.tokenizer, loaded.model.eval()
    head = tok.encode(prompt)
    for text in continuations:
        ids = tok.encode(prompt + text)
        if len(ids) <= len(head):
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        nll -= float(logp[len(head) - 1 :].sum())
        n += len(ids) - len(head)
    return math.exp(nll / n) if n else math.nan


def continuations(model_spec: str, prompt: str, samples: int, max_tokens: int) -> list[str]:
    """One greedy and `samples` sampled continuations, batched on the engine."""
    engine, _ = load_engine(model_spec, max_batch=max(samples + 1, 1))
    try:
        engine.start()
        ids = engine.encode_prompt(prompt)
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0)]
        params += [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95,
                                  seed=i) for i in range(samples)]  # fmt: skip
        handles = [engine.submit(ids, p) for p in params]
        return [h.result().text for h in handles]
    finally:
        engine.stop()


# ---- what it prints ----------------------------------------------------------------------------


def users_share(answers: list[tuple[str, str, str | None]]) -> float:
    return sum(complies(a) for _, a, _ in answers) / max(len(answers), 1)


def print_gate(decision: dict[str, Any]) -> None:
    f = decision["figures"]
    verdict = "PROMOTED" if decision["promote"] else "REJECTED (the current version keeps serving)"
    print(f"   gate: {verdict}")
    if "current_base_ppl" in f:  # absent when the cycle stopped before training
        print(
            f"   base-val perplexity {f['current_base_ppl']:.3f} -> {f['candidate_base_ppl']:.3f}"
        )
    j, a, p = f.get("judge") or {}, f.get("answers") or {}, f.get("pairs") or {}
    if j:
        print(f"   the gate's judge (learned from the feedback, no rule): {judge_summary(j)}")
    if a.get("win"):
        w, d = a["win"], a["degenerate"]
        print(f"   {a['n']} held-out prompts answered by both versions: the candidate wins "
              f"{w['win_rate']:.0%} (95% CI {w['interval'][0]:.0%} to {w['interval'][1]:.0%}); "
              f"degenerate answers {d['current']['share']:.0%} -> {d['candidate']['share']:.0%}")  # fmt: skip
    if p.get("n"):
        print(f"   {p['n']} held-out pairs: preference margin gain {p['gain']:+.2f} (95% CI "
              f"{p['gain_low']:+.2f} to {p['gain_high']:+.2f})")  # fmt: skip
    print(f"   why: {decision['reason']}")


def print_before_after(
    before: list[tuple[str, str, str | None]], after: list[tuple[str, str, str | None]]
) -> None:
    q, a, va = before[0]  # the first question, whichever version answers it better
    _, b, vb = after[0]
    print(f"   the same held-out question, before and after:\n   Q: {q}")
    print(f"   {va}: {short(a, 220)}\n   {vb}: {short(b, 220)}")
    print(f"   held-out questions answered as the users prefer: {users_share(before):.0%} "
          f"({va}) -> {users_share(after):.0%} ({vb})")  # fmt: skip


def judge_continuations(
    model_spec: str, teacher_spec: str, samples: int, max_tokens: int
) -> dict[str, Any]:
    """Continuations of "Once upon a time" (one greedy, `samples` sampled) scored by the
    teacher's perplexity, and the share with a word repeated three times in a row; printed."""
    prompt = "Once upon a time"
    conts = continuations(model_spec, prompt, samples, max_tokens)
    teacher = load_model(teacher_spec)
    quality = {
        "greedy_teacher_ppl": teacher_perplexity(teacher, prompt, conts[:1]),
        "sampled_teacher_ppl": teacher_perplexity(teacher, prompt, conts[1:]),
        "repeated_word_share": sum(map(repeats_a_word, conts)) / len(conts),
        "greedy": conts[0],
        "sampled": conts[1:],
    }
    del teacher
    print(f"   greedy:  {prompt}{short(conts[0], 160)}")
    for c in conts[1:3]:
        print(f"   sampled: {prompt}{short(c, 160)}")
    print(f"   the teacher's perplexity of these continuations: greedy "
          f"{quality['greedy_teacher_ppl']:.1f}, sampled {quality['sampled_teacher_ppl']:.1f}; "
          f"a word repeated 3 times in a row in {quality['repeated_word_share']:.0%} of "
          f"{len(conts)}")  # fmt: skip
    return quality


def progress_printer(total: int) -> Callable[[list[Exchange]], None]:
    """`users.converse`'s progress: a line every 8 rated conversations (and at the end)."""
    t = time.monotonic()

    def rated(done: list[Exchange]) -> None:
        if len(done) % 8 == 0 or len(done) == total:
            good = sum(e.complied for e in done)
            fixed = sum(e.correction is not None for e in done)
            print(f"   [{len(done)}/{total}] conversations rated: {good} answers "
                  f"complied, {fixed} corrected ({time.monotonic() - t:.0f} s)",
                  flush=True)  # fmt: skip

    return rated


def print_next_steps(home: Path, promoted: bool) -> None:
    """What to try next, ending with the command that opens the chat page on the assistant."""
    chat = f"LMLOOP_HOME={home} lmloop serve --model registry:assistant"
    print(
        "\nGo further:\n"
        f"   lmloop data --source my_texts/ --out data/mine && lmloop train "
        "configs/train/tiny-cpu.yaml --data data/mine --out runs/mine\n"
        "   lmloop train configs/train/wikitext-103-gpu.yaml --data data/wikitext-103   "
        "# the GPU recipe\n"
        f"\nTalk to the {'improved ' if promoted else ''}assistant (then open "
        f"http://127.0.0.1:8000/):\n   {chat}"
    )


def short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
