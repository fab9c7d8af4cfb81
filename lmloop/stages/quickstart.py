"""`lmloop quickstart`: the whole loop on the embedded default, end to end, offline.

corpus (the shipped teacher writes stories; `lmloop data`) -> train `stories` v1 from scratch ->
evaluate -> serve `assistant` v1 to simulated users (`lmloop.loop.users`) -> one `lmloop loop`
cycle -> a summary (docs/quickstart.md). Everything runs in `out/` with its own registry and
feedback store (`out/home`), so a rerun starts from the shipped model again; the corpus and,
when nothing it depends on changed, the from-scratch run are reused.

    lmloop quickstart                 # ~7.5 min on 2 CPU cores the first time
    lmloop quickstart --serve         # then keep serving the assistant (open the chat page)"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmloop.artifacts import sha256_json
from lmloop.config import to_dict
from lmloop.data.sources import SourceSpec
from lmloop.data.synthetic import synthetic_stories
from lmloop.loop import users
from lmloop.loop.config import LOOP_TRAIN, STUDENT, LoopConfig, LoopResult, QuickstartConfig
from lmloop.loop.gate import NotEnoughSignal
from lmloop.loop.quickstart import (
    Corpus,
    Cycle,
    Deployment,
    Judged,
    ServeProcess,
    Student,
    Workspace,
    free_port,
    judge_continuations,
    print_before_after,
    print_gate,
    print_next_steps,
    progress_printer,
    say,
    short,
    users_share,
    workspace,
)
from lmloop.registry.spec import locate, run_checkpoint
from lmloop.stages import data as data_stage
from lmloop.stages import evaluate as eval_stage
from lmloop.stages import loop as loop_stage
from lmloop.stages import train as train_stage
from lmloop.training.checkpoint import read_run

__all__ = ["QuickstartConfig", "run"]


# ---- 1. collect + preprocess --------------------------------------------------------------------


def write_corpus(cfg: QuickstartConfig, ws: Workspace) -> Corpus:
    """The teacher writes the stories (cached); `lmloop data` prepares them and trains a BPE."""
    say("[1/6]", f"corpus: {cfg.teacher} writes {cfg.stories} short stories (cached)")
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
    corpus = ws.out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    data = data_stage.run(data_stage.DataConfig(
        source=[SourceSpec(path=str(corpus))], out=str(ws.out / "data"), vocab_size=cfg.vocab_size,
        val_fraction=0.1, test_fraction=0.1,
    ))  # fmt: skip
    print(f"   a training story: {short(stories[0], 200)}")
    return Corpus(stories, report, corpus, data)


# ---- 2. train -----------------------------------------------------------------------------------


def _fit_or_reuse(cfg: QuickstartConfig, data_dir: Path, run_dir: Path) -> None:
    """The seed's GPT from scratch; reuses a finished run of the same config on the same data."""
    tc = train_stage.TrainConfig(
        data=str(data_dir), out=str(run_dir), max_steps=cfg.train_steps,
        save_every=cfg.eval_every, keep_last=1, log_every=cfg.eval_every,
        model=train_stage.ModelSpec(family="gpt", positions="sinusoidal", hidden_size=cfg.hidden_size,
                        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                        tie_word_embeddings=False),
        optim=train_stage.OptimSpec(lr=cfg.lr, weight_decay=0.1),
        schedule=train_stage.ScheduleSpec(kind="cosine", warmup_steps=max(1, cfg.train_steps // 10)),
        batch=train_stage.BatchSpec(seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                        global_batch=cfg.micro_batch),
        eval=train_stage.EvalSpec(every=cfg.eval_every, batches=8, patience=cfg.patience),
    )  # fmt: skip
    data_meta = json.loads((data_dir / "meta.json").read_text())
    stamp = sha256_json({"train": to_dict(tc), "data": data_meta.get("fingerprint")})
    stamp_file = run_dir.parent / "run.stamp"
    meta = read_run(run_dir) if run_dir.is_dir() else None
    if meta and meta.get("status") == "done" and stamp_file.is_file():
        if stamp_file.read_text() == stamp:
            print(f"   reusing {run_dir} (same config, same data)", flush=True)
            return
    if run_dir.exists():  # a run from an earlier quickstart (perhaps on other data): start over
        shutil.rmtree(run_dir)
    train_stage.run(tc)
    stamp_file.write_text(stamp)


def train_from_scratch(cfg: QuickstartConfig, ws: Workspace, corpus: Corpus) -> Student:
    """The seed's GPT from scratch, early-stopped; its best checkpoint becomes `stories` v1."""
    say("[2/6]", f"train: the seed's GPT ({cfg.num_layers} layers, width {cfg.hidden_size}, "
        "sinusoidal positions) from scratch, early stop on validation")  # fmt: skip
    run_dir = ws.out / "run"
    _fit_or_reuse(cfg, corpus.data.out, run_dir)
    best = run_checkpoint(run_dir)
    run_meta = json.loads((run_dir / "meta.json").read_text())
    best_val = next((c["val_loss"] for c in run_meta.get("checkpoints", [])
                     if c["name"] == best.name), None)  # fmt: skip
    version = ws.registry.register("stories", best, lineage={"data": str(corpus.data.out),
                                   "run": str(run_dir), "val_loss": best_val})  # fmt: skip
    ws.registry.promote("stories", version)
    print(f"   best checkpoint {best.name} (validation loss {best_val:.3f}) registered as "
          f"stories {version}; curves: {run_dir / 'curves.png'}")  # fmt: skip
    return Student(best, best_val, run_dir)


# ---- 3. evaluate --------------------------------------------------------------------------------


def evaluate_student(cfg: QuickstartConfig, ws: Workspace, student: Student) -> Judged:
    """Test perplexity; continuations of "Once upon a time" scored by the teacher."""
    say("[3/6]", "evaluate: test perplexity, continuations, and what the teacher thinks of them")
    eval_dir = ws.out / "eval"
    rep = eval_stage.run(eval_stage.EvalConfig(
        model=str(student.best), text=str(ws.out / "data"), split="test", out=str(eval_dir),
        max_new_tokens=0, quiet=True,
    ))  # fmt: skip
    r = rep.report
    print(f"   test split: token perplexity {r['token_perplexity']:.2f}, word perplexity "
          f"{r['word_perplexity']:.1f}, bits/byte {r['bits_per_byte']:.3f}")  # fmt: skip
    quality = judge_continuations(str(student.best), cfg.teacher, cfg.samples, cfg.sample_tokens)
    (eval_dir / "continuations.json").write_text(json.dumps(quality, indent=2))
    return Judged(r, quality, eval_dir)


# ---- 4. deploy + interact -----------------------------------------------------------------------


def deploy_and_collect_feedback(
    cfg: QuickstartConfig, ws: Workspace, corpus: Corpus, student: Student
) -> Deployment:
    """The assistant registered and served over HTTP; simulated users rate and correct it. The
    server keeps running for the loop (stopped here only if this step fails)."""
    assistant = str(student.best) if cfg.assistant == STUDENT else str(locate(cfg.assistant).path)
    say("[4/6]", f"deploy + interact: {cfg.assistant} as `assistant` v1, served over HTTP")
    v1 = ws.registry.register("assistant", Path(assistant), lineage={"source": cfg.assistant})
    ws.registry.promote("assistant", v1)
    base_dir = corpus.data.out
    if cfg.assistant != STUDENT:  # the gate's base corpus, in the assistant's own tokens
        base_dir = ws.out / "data-assistant"
        data_stage.run(data_stage.DataConfig(
            source=[SourceSpec(path=str(corpus.path))], out=str(base_dir), tokenizer=assistant,
            val_fraction=0.1, test_fraction=0.1,
        ))  # fmt: skip
    db = ws.home / "feedback.db"
    db.unlink(missing_ok=True)
    port = cfg.port if cfg.serve else free_port()
    server = ServeProcess("registry:assistant", port, db, ws.out / "logs" / "serve.log", ws.env)
    try:
        server.wait_ready()
        print(f"   serving assistant {server.version()} at {server.url} (chat page: {server.url}/)")
        print(f"   the users' preference: {users.PREFERENCE}")
        held = users.HELDOUT_TOPICS[: cfg.heldout]
        before = users.answer_all(server.url, "assistant", held, max_tokens=cfg.answer_tokens)
        topics = [users.TRAIN_TOPICS[i % len(users.TRAIN_TOPICS)] for i in range(cfg.conversations)]
        rated = progress_printer(len(topics))
        exchanges = users.converse(server.url, "assistant", topics, max_tokens=cfg.answer_tokens,
                                   users=cfg.users, progress=rated)  # fmt: skip
    except BaseException:
        server.stop()
        raise
    bad = next((e for e in exchanges if e.correction), exchanges[0])
    print(f"   e.g. Q: {bad.prompt}\n        A: {short(bad.answer, 150)}\n"
          f"        correction: {bad.correction}")  # fmt: skip
    return Deployment(server, v1, base_dir, db, held, before, exchanges)


# ---- 5. loop ------------------------------------------------------------------------------------


def run_loop_cycle(cfg: QuickstartConfig, ws: Workspace, dep: Deployment) -> Cycle:
    """One `lmloop loop` cycle on the feedback; the server hot-reloads a promoted version and the
    held-out questions are asked again."""
    say("[5/6]", "loop: one cycle (SFT + DPO with LoRA), the gate, a hot reload")
    steps = {
        k: v
        for k, v in (("sft_steps", cfg.sft_steps), ("pref_steps", cfg.pref_steps))
        if v is not None
    }  # a test's tiny cycle; the demo runs `lmloop loop`'s defaults
    lc = LoopConfig(
        name="assistant", db=str(dep.db), base_data=str(dep.base_dir),
        work_dir=str(ws.out / "loop"), registry=str(ws.home / "registry"), new_cycle=True,
        train=replace(LOOP_TRAIN, log_every=1), **steps,  # a progress line every 3-5 s
    )  # fmt: skip
    try:
        result = loop_stage.run(lc)
        decision = json.loads((result.cycle_dir / "decision.json").read_text())
    except NotEnoughSignal as e:  # the feedback cannot tell answers apart: nothing to promote
        result = LoopResult(ws.out / "loop", False, None, e.line(), {})
        decision = {"promote": False, "reason": e.line(), "figures": {}}
    print_gate(decision)
    server = dep.server
    if result.promoted:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.version() != result.version:
            time.sleep(0.5)
        print(f"   the running server hot-reloaded: assistant {dep.v1} -> {server.version()}")
    after = users.answer_all(server.url, "assistant", dep.held, max_tokens=cfg.answer_tokens)
    print_before_after(dep.before, after)
    return Cycle(result, decision, after)


# ---- 6. summary ---------------------------------------------------------------------------------


def summarize(cfg: QuickstartConfig, ws: Workspace, seconds: float, corpus: Corpus,
              student: Student, judged: Judged, dep: Deployment, cycle: Cycle) -> None:  # fmt: skip
    """summary.json, the artifacts, what to try next; with --serve, serve until Ctrl-C."""
    r, quality, result, ex = judged.report, judged.quality, cycle.result, dep.exchanges
    summary = {
        "corpus": corpus.report, "data": corpus.data.meta.get("splits"),
        "best": student.best.name, "best_val_loss": student.val_loss,
        "test": {k: r[k] for k in ("token_perplexity", "word_perplexity", "bits_per_byte")},
        "quality": {k: v for k, v in quality.items() if k.endswith(("ppl", "share"))},
        "conversations": len(ex), "complied": sum(e.complied for e in ex),
        "gate": cycle.decision["reason"], "promoted": result.promoted, "version": result.version,
        "before": [[q, a, v] for q, a, v in dep.before],
        "after": [[q, a, v] for q, a, v in cycle.after],
        "heldout_share": [users_share(dep.before), users_share(cycle.after)],
    }  # fmt: skip
    (ws.out / "summary.json").write_text(json.dumps(summary, indent=2))
    say("[6/6]", f"done in {seconds:.0f} s. Artifacts:")
    data_dir, run_dir = corpus.data.out, student.run_dir
    for label, path in [
        ("prepared data", data_dir), ("data report", data_dir / "report.md"),
        ("training run", run_dir), ("curves", run_dir / "curves.png"),
        ("eval report", judged.eval_dir / "report.md"), ("feedback store", dep.db),
        ("loop cycle", result.cycle_dir), ("gate decision", result.cycle_dir / "decision.json"),
        ("summary", ws.out / "summary.json"),
    ]:  # fmt: skip
        if Path(path).exists():
            print(f"   {label:<15} {path}")
    print_next_steps(ws.home, result.promoted)
    if cfg.serve:
        print(f"\nServing at {dep.server.url}/ — press Ctrl-C to stop.", flush=True)
        try:
            dep.server.proc.wait()
        except KeyboardInterrupt:
            dep.server.stop()


# ---- the run ------------------------------------------------------------------------------------


def run(cfg: QuickstartConfig) -> int:
    t_start = time.monotonic()
    ws = workspace(cfg)
    corpus = write_corpus(cfg, ws)
    student = train_from_scratch(cfg, ws, corpus)
    judged = evaluate_student(cfg, ws, student)
    dep = deploy_and_collect_feedback(cfg, ws, corpus, student)
    try:
        cycle = run_loop_cycle(cfg, ws, dep)
        if not cfg.serve:  # --serve: it keeps serving the assistant after the summary
            dep.server.stop()
        summarize(cfg, ws, time.monotonic() - t_start, corpus, student, judged, dep, cycle)
    except BaseException:
        dep.server.stop()  # never leave the child server running
        raise
    return 0
