"""Does the loop teach a model what users asked for? One cycle on SmolLM2-135M-Instruct, measured.

    .venv/bin/python bench/loop.py                      # ~30 min on 2 CPU cores
    .venv/bin/python bench/loop.py --conversations 32 --skip-text --skip-coin   # quicker

1. SmolLM2-135M-Instruct is registered as `assistant` v1 and served by `lmloop serve` (int8).
2. Simulated users (`lmloop.loop.users`) state their preference: two sentences, a short
   answer (at least four words) then a question back. They hold one conversation per training
   topic through the HTTP API (temperature 0.7, 8 users at once), rate every answer, and correct
   each bad one with a compliant rewrite.
3. Held-out questions on *other* topics are answered greedily through the API: compliant share
   before.
4. One `lmloop loop` cycle (preference recipe: SFT + DPO, LoRA; the gate with the same rule);
   the running server hot-reloads the promoted version; the held-out questions are answered
   again: compliant share after.
5. Side by side, in the same run, on the same store: the earlier recipe (`recipe=text`: the
   feedback as plain text in continued pretraining), and a coin-flip control (the same answers
   and rewrites, the preferred one chosen by a coin): neither is promoted, the gate must refuse
   the control, and their candidates' held-out compliance is measured offline (fp32 engine,
   greedy, the same questions) beside the preference candidate's.

The base corpus that guards general ability is the TinyStories sample in ../shared/data,
tokenized with SmolLM2's tokenizer (val 5%; the loop replays its train split).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, db: Path, log: Path, env: dict) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--port", str(port),
           "--db", str(db), "--int8", "registry_poll=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit("lmloop serve exited: " + log.read_text()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("lmloop serve did not become healthy")


def share(answers: list[str]) -> float:
    from lmloop.loop.users import complies

    return sum(complies(a) for a in answers) / len(answers)


def coin_store(src: Path, dst: Path, seed: int = 0) -> int:
    """The control: each corrected exchange's answer and rewrite, the winner by a coin flip."""
    from lmloop.feedback.store import FeedbackStore

    rng = random.Random(seed)
    n = 0
    with FeedbackStore(src, create=False) as a, FeedbackStore(dst) as b:
        for resp in a.responses():
            fb = a.feedback_for(resp["id"])
            fix = next((f["correction"] for f in fb if f["correction"]), None)
            if fix is None:
                continue
            msgs = a.thread(resp["prompt_message_id"])
            texts = [a.message_text(resp["message_id"]) or "", fix]
            ids = []
            for k, text in enumerate(texts):
                rid = f"{resp['id']}-{k}"
                b.record_exchange(messages=msgs, response_text=text, response_id=rid,
                                  model_name="assistant", model_version=resp["model_version"],
                                  checkpoint_sha="x", params={}, prompt_tokens=1,
                                  completion_tokens=1, latency_ms=1.0)  # fmt: skip
                ids.append(rid)
            win, lose = ids if rng.random() < 0.5 else ids[::-1]
            b.add_feedback(win, thumb="up")
            b.add_feedback(lose, thumb="down")
            b.add_feedback(win, preferred_over=lose)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--sft-steps", type=int, default=24)
    ap.add_argument("--pref-steps", type=int, default=20)
    ap.add_argument("--answer-tokens", type=int, default=80)
    ap.add_argument("--lr", type=float, default=4e-4, help="the loop's fine-tuning learning rate")
    ap.add_argument("--skip-text", action="store_true", help="skip the text-recipe comparison")
    ap.add_argument("--skip-coin", action="store_true", help="skip the coin-flip control")
    ap.add_argument("--work", default=None, help="workspace (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if not STORIES.exists():
        raise SystemExit(f"{STORIES} not found: this benchmark reads ../shared/data")

    work = Path(args.work or tempfile.mkdtemp(prefix="lmloop-bench-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LMLOOP_HOME"] = str(work / "home")
    os.environ["LMLOOP_NO_PROGRESS"] = "1"
    env = dict(os.environ)

    from lmloop.data.sources import SourceSpec
    from lmloop.loop.users import HELDOUT_TOPICS, PREFERENCE, TRAIN_TOPICS, answer_all, converse
    from lmloop.registry import Registry
    from lmloop.stages import data as data_stage
    from lmloop.stages import loop as loop_stage

    figures: dict = {"preference": PREFERENCE}
    t0 = time.monotonic()
    base = data_stage.run(data_stage.DataConfig(
        source=[SourceSpec(path=str(STORIES), split="regex", pattern="<\\|endoftext\\|>")],
        out=str(work / "base"), tokenizer=MODEL, val_fraction=0.05, test_fraction=0.0,
        min_chars=32,
    ))  # fmt: skip
    from lmloop.registry.spec import locate

    registry = Registry()
    registry.register("assistant", locate(MODEL).path, lineage={"note": "the shipped model"})
    registry.promote("assistant", "v1")
    print(f"setup (base data, registry): {time.monotonic() - t0:.0f} s; base val "
          f"{base.split('val')['documents']} documents", flush=True)  # fmt: skip

    db = work / "feedback.db"
    proc, url = serve("registry:assistant", db, work / "serve.log", env)
    try:
        t = time.monotonic()
        train_topics = (TRAIN_TOPICS * 4)[: args.conversations]
        ex = converse(url, "assistant", train_topics, max_tokens=args.answer_tokens, seed=0)
        figures["collect"] = {"conversations": len(ex), "complied": sum(e.complied for e in ex),
                              "seconds": time.monotonic() - t}  # fmt: skip
        print(f"collected {len(ex)} rated conversations in {time.monotonic() - t:.0f} s "
              f"({figures['collect']['complied']} already complied)", flush=True)  # fmt: skip
        held = HELDOUT_TOPICS[: args.heldout]
        before = answer_all(url, "assistant", held, max_tokens=96)
        figures["served_before"] = share([a for _, a, _ in before])
        print(f"held-out compliance before (served, greedy): {figures['served_before']:.0%}")

        def cycle(name: str, store: Path, **kw) -> dict:
            cfg = loop_stage.LoopConfig(
                name="assistant", db=str(store), base_data=str(base.out),
                work_dir=str(work / f"loop-{name}"), sft_steps=args.sft_steps,
                pref_steps=args.pref_steps, max_eval_documents=60, eval_window=512,
                gate=loop_stage.GateSpec(rule="lmloop.loop.users:complies", rule_tokens=96),
                train=replace(loop_stage.LOOP_TRAIN,
                              optim=replace(loop_stage.LOOP_TRAIN.optim, lr=args.lr)),
                **kw,
            )  # fmt: skip
            t = time.monotonic()
            res = loop_stage.run(cfg)
            seconds = time.monotonic() - t
            state = json.loads((res.cycle_dir / "state.json").read_text())
            f = res.figures
            out = {
                "seconds": seconds,
                "promoted": res.promoted,
                "reason": res.reason,
                "candidate": state["results"]["preference"],
                "base_ppl": [f["current_base_ppl"], f["candidate_base_ppl"]],
                "base_change": f["candidate_base_ppl"] / f["current_base_ppl"] - 1,
                "pairs": f.get("pairs"),
                "rule": f.get("rule"),
            }
            if args.json:  # partial figures survive an interrupted run
                Path(args.json).write_text(json.dumps({**figures, name: out}, indent=2))
            print(f"[{name}] cycle {seconds / 60:.1f} min; promoted={res.promoted}; "
                  f"base ppl {out['base_change']:+.2%}", flush=True)  # fmt: skip
            return out

        figures["preference_cycle"] = cycle("preference", db)
        version = registry.current("assistant")[0]
        if figures["preference_cycle"]["promoted"]:
            import httpx

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                v = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
                if v.get("model_version") == version:
                    break
                time.sleep(1)
        after = answer_all(url, "assistant", held, max_tokens=96)
        figures["served_after"] = share([a for _, a, _ in after])
        figures["served_versions"] = [before[0][2], after[0][2]]
        print(f"held-out compliance after (served by {after[0][2]}): "
              f"{figures['served_after']:.0%}", flush=True)  # fmt: skip
        figures["examples"] = [
            {"question": q, "before": a, "after": b}
            for (q, a, _), (_, b, _) in list(zip(before, after))[:4]
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    registry.promote("assistant", "v1")  # the comparisons start from the same model
    if not args.skip_text:
        figures["text_cycle"] = cycle("text", db, recipe="text", promote=False)
    if not args.skip_coin:
        coin = work / "coin.db"
        figures["coin_pairs"] = coin_store(db, coin)
        figures["coin_cycle"] = cycle("coin", coin, promote=False)

    from lmloop.loop.gate import answer_greedily
    from lmloop.loop.users import prompts as questions

    chats = [[{"role": "user", "content": q}] for _, q in questions(held, 1)]
    offline = {"base": MODEL}
    for name in ("preference", "text", "coin"):
        if f"{name}_cycle" in figures:
            offline[name] = figures[f"{name}_cycle"]["candidate"]
    figures["offline_share"] = {
        name: share(answer_greedily(spec, chats, 96)) for name, spec in offline.items()
    }
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def print_table(f: dict) -> None:
    print("\n== does the loop teach what users asked for?")
    print(f"preference: {f['preference']}")
    print(f"collected: {f['collect']['conversations']} conversations "
          f"({f['collect']['complied']} complied already)")  # fmt: skip
    print(
        f"held-out compliance, served greedy: {f['served_before']:.0%} "
        f"({f['served_versions'][0]}) -> {f['served_after']:.0%} ({f['served_versions'][1]})"
    )
    rows = [("recipe", "cycle min", "promoted", "base ppl", "pairs gain [95% CI]",
             "rule on cycle's held-out", "held-out compliance (offline)")]  # fmt: skip
    off = f["offline_share"]
    for name in ("preference", "text", "coin"):
        c = f.get(f"{name}_cycle")
        if not c:
            continue
        p, r = c["pairs"] or {}, c["rule"] or {}
        gain = (f"{p['gain']:+.2f} [{p['gain_low']:+.2f}, {p['gain_high']:+.2f}]"
                if p.get("n") else "-")  # fmt: skip
        rule = f"{r['current']:.0%} -> {r['candidate']:.0%}" if r.get("n") else "-"
        rows.append((name, f"{c['seconds'] / 60:.1f}", str(c["promoted"]),
                     f"{c['base_change']:+.2%}", gain, rule,
                     f"{off['base']:.0%} -> {off.get(name, float('nan')):.0%}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    for e in f.get("examples", [])[:2]:
        print(f"\nQ: {e['question']}\n  before: {e['before'][:200]}\n  after:  {e['after'][:200]}")


if __name__ == "__main__":
    main()
