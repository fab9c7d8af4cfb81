"""Soak: a real `lmloop serve` under streaming clients, an abusive client and a registry promotion,
and a real `lmloop loop` killed at each of its phases (issue 29). Loopback only: it starts its
own servers on 127.0.0.1 and talks to nothing else; everything is written under a temporary
folder (its own `LMLOOP_HOME`).

    .venv/bin/python bench/soak.py --model smollm2-135m-instruct           # the 10-minute soak
    .venv/bin/python bench/soak.py --duration 30 --clients 8 --kill-mode chain  # smoke check
    .venv/bin/python bench/soak.py --phases kill                           # one part only

Without `--model`, the script trains a tiny model first (a random-word corpus, `lmloop data`,
30 steps of `lmloop train`, ~15 s) and serves that. The `kill` phase always uses the tiny
model: it runs a loop cycle per kill point (`--kill-mode chain`: one). `--phases` picks any of:

**soak** (`--duration` seconds): the first half runs `--clients` streaming chat clients (greedy,
`--max-tokens` each, one request after another), each posting feedback on every answer it
finishes; the second half adds abusive clients (one per 10 well-behaved ones, at least one), each
cycling through: a 0.8 MB body of 60,000 prompts with n=8, echo + logprobs on a long prompt, a
prompt longer than the context, invalid JSON, and a request with `Host: attacker.example`.
Printed: p50 and p99 inter-token latency of the well-behaved streams in each half (gaps between
chunks that carry text; the time to first token apart, since it holds the wait for a batch row),
the server's resident memory after warm-up, over the run, at its peak, at the end and at rest
6 s after the load (a heap trim between), by component from /metrics, 5xx answers to valid and to
abusive requests, and feedback rows acknowledged and found in the database afterwards.

**promote** (`--promote-duration` seconds, default the smaller of `--duration` and 60): the
model is registered as `soak` v1 in a fresh registry and served as `--model registry:soak`
(`registry_poll=0.5`); the same streaming clients run, and halfway `lmloop models register soak
NEXT --promote` (what `lmloop loop` does on a pass: register, then promote; NEXT is
`--next-model`, default the same weights again as v2) moves the registry while they stream. The
server follows it (`ModelSlot.follow_registry`). Printed: which versions answered streams started
before the promotion and after the first v2 answer (the `x-lmloop-model-version` header of each
stream), how long the reload took, the streams in flight across it, 5xx answers during the switch
and in all (target 0), and whether every feedback row acknowledged before and after carries,
in the database, the version whose answer it rates (target: all; 0 lost).

**kill**: a feedback store with a learnable preference (the answer that asks the user something
back is preferred, as in tests/test_loop.py) and a tiny `lmloop loop` cycle on it. For each kill
point, a fresh copy of the registry (v1 current) and a fresh work dir; the cycle runs as
`python bench/soak.py --loop-child POINT -- ARGS` (the same `lmloop loop ARGS`, with a test-only
hook installed in that child process: when the point is reached it prints a marker line and
waits; no production code reads anything for it) and gets SIGKILL (its process group) the moment
the marker appears. Points: `export` (collecting the feedback), `train` (the first fine-tuning
stage), `eval` (the held-out evidence), `gate` (the decision), `register` (inside
`Registry.register`: the version's folder is in place, registry.json not yet written; the worst
moment for the registry) and `promote` (registered, not yet current). Then the registry is
checked: the current version is listed, its files hash to its recorded sha256 (every listed
version's too), and a folder under versions/ that registry.json does not list (a temporary or
orphaned one) is reported and never counted as a version; the state is the old one (v1 current)
or the fully promoted new one, never between. Then the same `lmloop loop ARGS` is run again
(no hook) and must finish (exit 0, the cycle's register step done) with a registry that passes
the same check. One line per point: killed at X -> registry state -> rerun ok/failed.
`--kill-mode chain` (about one cycle's time instead of one per point) kills a single cycle at
each point in turn: the run after each kill is the same command with the next point's hook, so
its rerun is "ok" when it resumed the cycle and reached the next point; the run after the last
kill has no hook and must finish as above.

Exit status: 1 when the kill phase found a half state or a failed rerun, or a server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lmloop (torch-free parts only, in this process)

from lmloop.artifacts import cache_dir, sha256_tree  # noqa: E402
from lmloop.feedback.store import FeedbackStore  # noqa: E402

MSGS = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
REST_S = 6.0  # seconds after the load, for the resident memory at rest (a heap trim between)
LONG = "The quick brown fox jumps over the lazy dog. " * 150  # ~1,500 tokens
WORDS = (
    "the a little big red blue fox dog cat bird sun tree ran sat saw found liked home park "
    "river hill house garden morning night boat rain snow apple song"
).split()
KILL_POINTS = ("export", "train", "eval", "gate", "register", "promote")
MARK = "soak-hook: reached "


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else float("nan")


# ---- a running server -----------------------------------------------------------------------


def lmloop(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmloop.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"`lmloop {' '.join(args)}` failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r


class Server:
    """`lmloop serve` as a child process, keyless (the origin check is part of what is soaked)."""

    def __init__(self, model: str, port: int, db: Path, log: Path, env: dict[str, str],
                 *extra: str) -> None:  # fmt: skip
        cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--host",
               "127.0.0.1", "--port", str(port), "--db", str(db), *extra]  # fmt: skip
        env = dict(env)
        env.pop("LMLOOP_API_KEY", None)
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 300) -> bool:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                print(self.log_path.read_text()[-2000:], file=sys.stderr)
                return False
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ---- clients ------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One finished stream: when it started and ended, the version that answered (its
    `x-lmloop-model-version` header) and the id of the feedback acknowledged on it."""

    start: float
    end: float
    version: str | None
    feedback: str | None


@dataclass
class Tally:
    gaps: dict[str, list[float]] = field(default_factory=lambda: {"calm": [], "abused": []})
    ttft: dict[str, list[float]] = field(default_factory=lambda: {"calm": [], "abused": []})
    phase: str = "calm"
    valid_5xx: list[float] = field(default_factory=list)  # when each one was answered
    abuse_5xx: int = 0
    valid: int = 0
    abusive: int = 0
    answers: list[Answer] = field(default_factory=list)
    rss: tuple[float, float] = (float("nan"), float("nan"))  # MB: after warm-up, at the end
    rss_trace: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    rss_rest: float = float("nan")  # MB, REST_S after the load stopped
    components: list[dict[str, float]] = field(default_factory=list)  # MB: after warm-up, end


async def good_client(c: httpx.AsyncClient, t: Tally, stop: float, max_tokens: int) -> None:
    body = {"messages": MSGS, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    while time.monotonic() < stop:
        t.valid += 1
        last, rid, start = None, None, time.monotonic()
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            version = r.headers.get("x-lmloop-model-version")
            if r.status_code >= 500:
                t.valid_5xx.append(time.monotonic())
            if r.status_code != 200:
                await r.aread()
                await asyncio.sleep(0.2)
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.monotonic()
                event = json.loads(line[6:])
                if "error" in event:
                    t.valid_5xx.append(now)
                rid = event.get("id", rid)
                # Inter-token gaps are between chunks that carry answer text; the role chunk
                # (sent before the request reaches the engine) and the finish chunk carry none.
                # Start to first text is the time to first token, counted apart: it holds the
                # wait for a free batch row, which is queueing, not a stall of a running stream.
                if not any(ch.get("delta", {}).get("content") for ch in event.get("choices", [])):
                    continue
                if last is None:
                    t.ttft[t.phase].append(now - start)
                else:
                    t.gaps[t.phase].append(now - last)
                last = now
        if rid:
            f = await c.post("/v1/feedback", json={"response_id": rid, "thumb": "up"})
            t.valid += 1
            fid = None
            if f.status_code >= 500:
                t.valid_5xx.append(time.monotonic())
            elif f.status_code == 200:
                fid = f.json()["id"]
            t.answers.append(Answer(start, time.monotonic(), version, fid))


async def abusive_client(c: httpx.AsyncClient, t: Tally, stop: float) -> None:
    huge = json.dumps({"prompt": ["Hi there."] * 60_000, "n": 8, "max_tokens": 4}).encode()
    json_h = {"content-type": "application/json"}
    cases = [
        ("POST", "/v1/completions", huge, json_h),
        ("POST", "/v1/completions",
         json.dumps({"prompt": LONG, "echo": True, "logprobs": 5, "max_tokens": 0}).encode(),
         json_h),
        ("POST", "/v1/completions", json.dumps({"prompt": LONG * 20, "max_tokens": 4}).encode(),
         json_h),
        ("POST", "/v1/chat/completions", b'{"messages": [', json_h),
        ("GET", "/v1/models", b"", {"host": "attacker.example"}),
    ]  # fmt: skip
    i = 0
    while time.monotonic() < stop:
        method, path, content, headers = cases[i % len(cases)]
        i += 1
        t.abusive += 1
        r = await c.request(method, path, content=content or None, headers=headers)
        if r.status_code >= 500:
            t.abuse_5xx += 1


async def soak(url: str, pid: int, args: argparse.Namespace) -> Tally:
    t = Tally()
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        warm = {"messages": MSGS, "max_tokens": 8}
        await c.post("/v1/chat/completions", json=warm)
        rss0 = rss_mb(pid)
        t.components.append(await resident_components(c))
        sampler = asyncio.create_task(sample_rss(t, pid, max(5.0, args.duration / 20)))
        start = time.monotonic()
        half, end = start + args.duration / 2, start + args.duration
        goods = [
            asyncio.create_task(good_client(c, t, end, args.max_tokens))
            for _ in range(args.clients)
        ]
        await asyncio.sleep(max(0.0, half - time.monotonic()))
        t.phase = "abused"
        bads = [
            asyncio.create_task(abusive_client(c, t, end))
            for _ in range(max(1, args.clients // 10))
        ]
        await asyncio.gather(*goods, *bads)
        t.rss = (rss0, rss_mb(pid))
        sampler.cancel()
        t.components.append(await resident_components(c))
        # Once the load has stopped and the server has given freed pages back (it trims its
        # heap every 5 s): what it keeps, where the end figure also holds what was in flight.
        await asyncio.sleep(REST_S)
        t.rss_rest = rss_mb(pid)
    return t


async def sample_rss(t: Tally, pid: int, every: float) -> None:
    """The server's resident memory every `every` seconds (a leak climbs; a cache levels off)."""
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(every)
        t.rss_trace.append((time.monotonic() - t0, rss_mb(pid)))


async def resident_components(c: httpx.AsyncClient) -> dict[str, float]:
    """MB per component from /metrics' `lmloop_resident_bytes` (weights, KV cache, prefix cache)."""
    out: dict[str, float] = {}
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith("lmloop_resident_bytes{"):
            comp = line.split('component="', 1)[1].split('"', 1)[0]
            out[comp] = float(line.rsplit(" ", 1)[1]) / 2**20
    return out


def feedback_versions(db: Path) -> dict[str, str]:
    """Each feedback row's id -> the model version of the answer it rates, from the database."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT f.id, r.model_version FROM feedback f JOIN responses r ON r.id = f.response_id"
        )
        return {fid: version for fid, version in rows}


def phase_soak(args: argparse.Namespace, tmp: Path, model: str, env: dict[str, str]) -> bool:
    print(f"\n== soak: {args.clients} streaming clients for {args.duration:.0f} s, abusive "
          f"ones in the second half ({model})", flush=True)  # fmt: skip
    db = tmp / "soak.db"
    server = Server(model, args.port, db, tmp / "soak-server.log", env)
    try:
        if not server.wait_ready():
            return False
        t = asyncio.run(soak(server.url, server.proc.pid, args))
    finally:
        server.stop()
    found = feedback_versions(db)
    ms = 1000.0
    for phase in ("calm", "abused"):
        g = t.gaps[phase]
        f = t.ttft[phase]
        print(f"{phase:7s} inter-token: p50 {pct(g, 50) * ms:.1f} ms, p99 {pct(g, 99) * ms:.1f} ms "
              f"({len(g)} gaps); first token: p50 {pct(f, 50) * ms:.0f} ms, p99 "
              f"{pct(f, 99) * ms:.0f} ms ({len(f)} streams)")  # fmt: skip
    calm, abused = pct(t.gaps["calm"], 99), pct(t.gaps["abused"], 99)
    print(f"p99 with the abusive clients / without: {abused / calm:.2f}x (target <= 2x)")
    rss0, rss1 = t.rss
    print(f"resident memory: {rss0:.0f} MB after warm-up, {rss1:.0f} MB at the end "
          f"({(rss1 / rss0 - 1) * 100:+.1f}%; target <= +5%)")  # fmt: skip
    if t.rss_trace:
        peak = max(mb for _, mb in t.rss_trace)
        print(f"resident memory: peak {peak:.0f} MB ({(peak / rss0 - 1) * 100:+.1f}%) while "
              f"loaded; {t.rss_rest:.0f} MB ({(t.rss_rest / rss0 - 1) * 100:+.1f}%) at rest "
              f"{REST_S:.0f} s after the load stopped")  # fmt: skip
    print(
        "resident memory over the run (s: MB): "
        + ", ".join(f"{x:.0f}: {mb:.0f}" for x, mb in t.rss_trace)
    )
    if len(t.components) == 2:
        a, b = t.components
        print(
            "by component (MB, after warm-up -> end): "
            + ", ".join(f"{k} {a.get(k, 0):.1f} -> {b.get(k, 0):.1f}" for k in sorted(b))
        )
    print(f"5xx: {len(t.valid_5xx)} of {t.valid} valid requests (target 0), {t.abuse_5xx} of "
          f"{t.abusive} abusive ones")  # fmt: skip
    acked = [a.feedback for a in t.answers if a.feedback]
    lost = [a for a in acked if a not in found]
    print(f"feedback: {len(acked)} acknowledged, {len(acked) - len(lost)} found, "
          f"{len(lost)} lost (target 0)")  # fmt: skip
    return True


# ---- promote: the registry moves while clients stream ------------------------------------------


async def promote_run(url: str, args: argparse.Namespace, promote) -> tuple[Tally, float]:
    """Streams for `args.promote_duration` s; `promote()` (blocking) runs halfway. Returns the
    tally and when the promotion had been written to the registry (monotonic seconds)."""
    t = Tally()
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 8})
        start = time.monotonic()
        end = start + args.promote_duration
        goods = [
            asyncio.create_task(good_client(c, t, end, args.max_tokens))
            for _ in range(args.clients)
        ]
        await asyncio.sleep(args.promote_duration / 2)
        await asyncio.to_thread(promote)
        promoted = time.monotonic()
        await asyncio.gather(*goods)
    return t, promoted


def phase_promote(args: argparse.Namespace, tmp: Path, model: str, env: dict[str, str]) -> bool:
    nxt = args.next_model or model
    print(f"\n== promote: {args.clients} streaming clients for {args.promote_duration:.0f} s on "
          f"registry:soak; halfway `lmloop models register soak {nxt} --promote`", flush=True)  # fmt: skip
    home = tmp / "home-promote"
    env = {**env, "LMLOOP_HOME": str(home)}
    lmloop("models", "register", "soak", model, "--promote", env=env)
    db = tmp / "promote.db"
    server = Server("registry:soak", args.port + 1, db, tmp / "promote-server.log", env,
                    "registry_poll=0.5")  # fmt: skip

    def promote() -> None:
        lmloop("models", "register", "soak", nxt, "--parent", "v1", "--promote", env=env)

    try:
        if not server.wait_ready():
            return False
        t, promoted = asyncio.run(promote_run(server.url, args, promote))
    finally:
        server.stop()
    answers = sorted(t.answers, key=lambda a: a.start)
    before = [a for a in answers if a.start < promoted]
    first_new = min((a.start for a in answers if a.version == "v2"), default=None)
    after = [a for a in answers if first_new is not None and a.start >= first_new]
    across = [a for a in answers if a.start < promoted <= a.end]

    def versions(xs: list[Answer]) -> str:
        counts: dict[str, int] = {}
        for a in xs:
            counts[str(a.version)] = counts.get(str(a.version), 0) + 1
        return ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())) or "none"

    print(f"streams started before the promotion: {versions(before)}")
    if first_new is None:
        print("the server did NOT reload: no stream was answered by v2")
    else:
        late = [a for a in answers if a.start > first_new and a.version != "v2"]
        print(f"reloaded: the first v2 answer started {first_new - promoted:.1f} s after the "
              f"registry moved; streams started since: {versions(after)} "
              f"({len(late)} answered by the old version after the first v2 one)")  # fmt: skip
        print(
            f"streams in flight when the registry moved: {versions(across)} (a request keeps "
            "the version it started on)"
        )
        between = [a for a in answers if promoted <= a.start < first_new]
        print(f"streams started after the registry moved, before the first v2 answer: "
              f"{versions(between)}")  # fmt: skip
    window = (promoted - 1.0, (first_new or promoted) + 2.0)
    during = [x for x in t.valid_5xx if window[0] <= x <= window[1]]
    print(
        f"5xx: {len(during)} during the switch, {len(t.valid_5xx)} of {t.valid} valid requests "
        "in all (target 0)"
    )
    found = feedback_versions(db)
    for label, xs in (("before the promotion", before), ("after the reload", after)):
        acked = [a for a in xs if a.feedback]
        lost = [a for a in acked if a.feedback not in found]
        wrong = [a for a in acked if a.feedback in found and found[a.feedback] != a.version]
        print(f"feedback acknowledged {label}: {len(acked)}, {len(lost)} lost, "
              f"{len(wrong)} carry another version than the answer's (target 0); stored "
              f"versions: {versions([Answer(0, 0, found.get(a.feedback), None) for a in acked])}")  # fmt: skip
    return True


# ---- kill: `lmloop loop` killed at each of its phases -----------------------------------------


def build_tiny(tmp: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A random-word corpus prepared by `lmloop data` and a tiny model trained on it for 30 steps
    (context 512, so the soak's prompts fit): (data dir, run dir)."""
    print("\n== building a tiny model (lmloop data + 30 steps of lmloop train)", flush=True)
    rng = random.Random(0)
    d = tmp / "tiny"
    d.mkdir(parents=True, exist_ok=True)
    with (d / "corpus.jsonl").open("w") as f:
        for i in range(120):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
            f.write(json.dumps({"text": f"Story {i}: {words}."}) + "\n")
    lmloop("data", "--source", str(d / "corpus.jsonl"), "--out", str(d / "data"),
           "vocab_size=300", "val_fraction=0.15", "test_fraction=0.1", "near_dedup=false",
           env=env)  # fmt: skip
    lmloop("train", "--data", str(d / "data"), "--out", str(d / "run"), "--max-steps", "30",
           "model.hidden_size=48", "model.num_layers=2", "model.num_heads=2",
           "model.max_seq_len=512", "batch.seq_len=64", "batch.micro_batch=8",
           "batch.global_batch=8", "eval.every=10", "eval.batches=2", "plot=false",
           "optim.lr=3e-3", "schedule.warmup_steps=2", env=env)  # fmt: skip
    return d / "data", d / "run"


def learnable_store(db: Path, n: int = 72) -> None:
    """n conversations, two answers each, the one asking the user something back preferred (a
    thumb each way and a pair): a preference a tiny model learns in one cycle."""
    rng = random.Random(11)
    topics = [f"{a} {b}" for a in WORDS[2:14] for b in WORDS[14:]]
    with FeedbackStore(db) as store:
        for i in range(n):
            topic = topics[i % len(topics)]
            msgs = [
                {"role": "user", "content": f"{' '.join(rng.choices(WORDS, k=6))} {topic} {i}?"}
            ]
            body = " ".join(rng.choice(WORDS) for _ in range(5))
            ids = []
            for k, text in enumerate((f"The {topic} {body}. Do you like it?",
                                      f"The {topic} {body}. The end.")):  # fmt: skip
                ids.append(store.record_exchange(
                    messages=msgs, response_text=text, response_id=f"r{i}-{k}",
                    model_name="tiny", model_version="v1", checkpoint_sha="x", params={},
                    prompt_tokens=5, completion_tokens=9, latency_ms=1.0))  # fmt: skip
            good, bad = f"r{i}-0", f"r{i}-1"
            store.add_feedback(good, thumb="up")
            store.add_feedback(bad, thumb="down")
            store.add_feedback(good, preferred_over=bad)


def loop_args(db: Path, data: Path, work: Path, registry: Path) -> list[str]:
    # tests/test_loop.py's tiny cycle: full fine-tuning steps that change the generated answers
    return ["loop", "name=tiny", f"db={db}", f"base_data={data}", f"work_dir={work}",
            f"registry={registry}", "sft_steps=30", "pref_steps=10", "train.batch.seq_len=64",
            "train.optim.lr=1e-3", "train.plot=false", "train.lora.r=0", "train.pref.beta=1.0",
            "gate.answer_tokens=24"]  # fmt: skip


def loop_child(point: str, argv: list[str]) -> int:
    """`lmloop loop ARGV` with the test-only hook: at `point`, print the marker and wait for the
    parent's SIGKILL. Only this child process is patched; lmloop reads nothing for it."""
    # torch and the loop are imported here, in the child only: the parent stays torch-free
    from lmloop.cli import main
    from lmloop.loop import recipe
    from lmloop.registry import Registry
    from lmloop.stages import loop as loop_stage
    from lmloop.stages import train as train_stage

    def reached() -> None:
        print(MARK + point, flush=True)
        time.sleep(3600)

    def hook(owner: object, attr: str) -> None:
        real = getattr(owner, attr)

        def wrapped(*a, **kw):
            reached()
            return real(*a, **kw)

        setattr(owner, attr, wrapped)

    targets = {"export": (recipe, "collect_feedback"), "train": (train_stage, "run"),
               "eval": (loop_stage, "pair_figures"), "gate": (loop_stage, "decide"),
               "promote": (Registry, "promote")}  # fmt: skip
    if point == "register":  # inside register: the version folder renamed into place, its
        real_register, real_write = Registry.register, Registry._write_state  # state not yet
        inside = []

        def register(self, *a, **kw):
            inside.append(True)
            return real_register(self, *a, **kw)

        def write_state(self, *a, **kw):
            if inside:
                reached()
            return real_write(self, *a, **kw)

        Registry.register, Registry._write_state = register, write_state
    else:
        hook(*targets[point])
    return main(argv)


def check_registry(root: Path, name: str) -> tuple[bool, str, str | None]:
    """(whole?, what it holds, the current version): the current version is listed, every
    listed version's files hash to its recorded sha256, a new current version carries the
    decision that promoted it; folders registry.json does not list are named, never counted."""
    d = root / name
    try:
        state = json.loads((d / "registry.json").read_text())
    except (OSError, ValueError) as e:
        return False, f"registry.json unreadable ({e})", None
    cur, listed, bad = state.get("current"), state.get("versions", []), []
    for v in listed:
        vd = d / "versions" / v
        try:
            info = json.loads((vd / "version.json").read_text())
        except (OSError, ValueError):
            bad.append(f"{v} has no readable version.json")
            continue
        if not (vd / "model").is_dir() or sha256_tree(vd / "model") != info.get("sha256"):
            bad.append(f"{v}'s files do not hash to its sha256")
        if v == cur and v != "v1" and not (info.get("lineage") or {}).get("decision"):
            bad.append(f"current {v} has no gate decision in its lineage")
    if cur not in listed:
        bad.append(f"current {cur} is not a listed version")
    on_disk = (
        sorted(p.name for p in (d / "versions").iterdir()) if (d / "versions").is_dir() else []
    )
    extra = [n for n in on_disk if n not in listed]
    what = (
        f"current {cur} ({'old' if cur == 'v1' else 'new, promoted'}), versions {'+'.join(listed)}"
    )
    what += ", files hash-verify" if not bad else "; HALF: " + "; ".join(bad)
    if extra:
        what += f", unlisted folder(s) {', '.join(extra)} (not versions)"
    return not bad, what, cur


def cycle_done(work: Path) -> list[str]:
    states = sorted(work.glob("cycle-*/state.json"))
    return json.loads(states[-1].read_text())["done"] if states else []


def kill_at(point: str, argv: list[str], env: dict[str, str]) -> tuple[bool, str]:
    """Run `lmloop loop ARGV` with the hook at `point`; SIGKILL its process group the moment the
    marker appears. (reached?, the last lines it printed when it was not)."""
    proc = subprocess.Popen([sys.executable, __file__, "--loop-child", point, "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    timer = threading.Timer(900, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    reached, tail = False, []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line)
        if line.startswith(MARK):
            os.killpg(proc.pid, signal.SIGKILL)
            reached = True
            break
    proc.wait()
    timer.cancel()
    proc.stdout.close()
    return reached, f"exit {proc.returncode}: {''.join(tail[-3:]).strip()[:300]}"


def rerun(argv: list[str], work: Path, reg: Path, env: dict[str, str]) -> tuple[bool, str]:
    """The same `lmloop loop ARGV`, no hook: (finished whole?, what it said and left)."""
    again = lmloop(*argv, env=env, check=False)
    whole, what, _ = check_registry(reg, "tiny")
    verdict = [x for x in again.stdout.splitlines() if x.startswith("loop: gate:")]
    said = verdict[0][12:80] if verdict else again.stderr.strip()[-200:]
    ok = again.returncode == 0 and "register" in cycle_done(work) and whole
    return ok, f"exit {again.returncode}, {said}...; registry: {what}"


def phase_kill(args: argparse.Namespace, tmp: Path, data: Path, run: Path,
               env: dict[str, str]) -> bool:  # fmt: skip
    points = [p for p in args.kill_points.split(",") if p]
    how = ("each in a fresh cycle, rerun to the end" if args.kill_mode == "fresh"
           else "one cycle, each run resuming it; the last rerun to the end")  # fmt: skip
    print(f"\n== kill: lmloop loop gets SIGKILL at {', '.join(points)} ({how}); the registry "
          "is checked after each", flush=True)  # fmt: skip
    kdir = tmp / "kill"
    pristine = kdir / "pristine"
    lmloop("models", "register", "tiny", str(run), "--promote", "--registry", str(pristine),
           env=env)  # fmt: skip
    db = kdir / "feedback.db"
    learnable_store(db)
    all_ok, pending = True, None
    for i, point in enumerate(points):
        pdir = kdir / (point if args.kill_mode == "fresh" else "chain")
        reg, work = pdir / "registry", pdir / "work"
        if not reg.exists():
            shutil.copytree(pristine, reg)
        argv = loop_args(db, data, work, reg)
        t0 = time.monotonic()
        reached, tail = kill_at(point, argv, env)
        if pending:  # chain: this run resumed the cycle the last one was killed in
            print(pending + (f"ok (the next run resumed it and reached {point})" if reached
                             else f"FAILED ({tail})"), flush=True)  # fmt: skip
            pending = None
        if not reached:
            print(f"{point:9s}: never reached ({tail})")
            all_ok = False
            continue
        whole, what, _ = check_registry(reg, "tiny")
        all_ok &= whole
        line = (f"killed at {point:8s} (state.json done: {', '.join(cycle_done(work)) or 'nothing'})"
                f" -> registry: {what} -> rerun ")  # fmt: skip
        if args.kill_mode == "chain" and i < len(points) - 1:
            pending = line
            continue
        ok, said = rerun(argv, work, reg, env)
        all_ok &= ok
        print(f"{line}{'ok' if ok else 'FAILED'} ({said}) [{time.monotonic() - t0:.0f} s]",
              flush=True)  # fmt: skip
    return all_ok


# ---- the run ------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--loop-child" and sys.argv[3] == "--":
        return loop_child(sys.argv[2], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phases", default="soak,promote,kill", help="any of soak, promote, kill")
    ap.add_argument("--model", help="model to serve (default: a tiny one trained first)")
    ap.add_argument("--next-model", help="promote: the version registered halfway (default: "
                    "--model again)")  # fmt: skip
    ap.add_argument("--duration", type=float, default=600.0, help="soak seconds (at most 3600)")
    ap.add_argument("--promote-duration", type=float,
                    help="promote seconds (default: the smaller of --duration and 60)")  # fmt: skip
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8931, help="soak's port; promote uses the next")
    ap.add_argument("--kill-points", default=",".join(KILL_POINTS),
                    help=f"kill: any of {', '.join(KILL_POINTS)}")  # fmt: skip
    ap.add_argument("--kill-mode", choices=("fresh", "chain"), default="fresh",
                    help="fresh: a new cycle per kill point, each rerun to the end; chain: one "
                    "cycle killed at each point in turn (about one cycle's time)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in ("soak", "promote", "kill")]
    unknown += [p for p in args.kill_points.split(",") if p and p not in KILL_POINTS]
    if unknown:
        ap.error(f"unknown phase or kill point: {', '.join(unknown)}")
    args.duration = min(max(args.duration, 10.0), 3600.0)  # bounded
    args.promote_duration = min(max(args.promote_duration or min(args.duration, 60.0), 10.0),
                                3600.0)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="lmloop-soak-"))
    # converted models stay in the user's cache; the registry and databases are this run's own
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMLOOP_NO_PROGRESS": "1",
           "LMLOOP_CACHE": str(cache_dir()), "LMLOOP_HOME": str(tmp / "home")}  # fmt: skip
    ok = True
    try:
        tiny = None
        if "kill" in phases or not args.model:
            tiny = build_tiny(tmp, env)
        model = args.model or str(tiny[1])
        if "soak" in phases:
            ok &= phase_soak(args, tmp, model, env)
        if "promote" in phases:
            ok &= phase_promote(args, tmp, model, env)
        if "kill" in phases:
            assert tiny is not None
            ok &= phase_kill(args, tmp, *tiny, env)
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
