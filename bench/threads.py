"""Engine decode speed by intra-op thread count, OpenMP wait policy and consumer (issue 18, item 2).

    .venv/bin/python bench/threads.py                                  # SmolLM2-135M, fp32 + int8
    .venv/bin/python bench/threads.py --threads 1 2 4 8 --batches 1 16 --new-tokens 64

Why two threads could make batch-1 decode slower than one, and where: each configuration runs in
a fresh process (OpenMP reads its environment once, when torch loads it), builds the engine with
`threads=N`, and decodes `--new-tokens` greedy tokens for B concurrent sequences, consumed

* `blocking`: by plain threads iterating the request handles (bench/generate.py's way), or
* `asyncio`: by an asyncio event loop in the main thread (`async for`, one JSON chunk encoded
  per token), which is how `lmloop serve` consumes the engine: a second Python thread that wants
  the GIL and a core once per token.

`--single-thread-rows K` runs decode steps of at most K rows on one thread (the engine's
`single_thread_rows`, LMLOOP_ENGINE_SINGLE_THREAD_ROWS; 0: every step on N threads).
OpenMP wait policies: `default` (libgomp spins a while after each parallel region, then sleeps),
`passive` (OMP_WAIT_POLICY=PASSIVE: sleeps at once) and `active` (spins). Reported: aggregate
decode tok/s after every sequence has its first token (the median of `--rounds`), and the ratio
to the 1-thread figure of the same row. Timings need an idle machine: on shared cores the
thread counts compete with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived a curious "
    "girl who loved to explore. One morning she found a strange map under her bed, and"
)
POLICIES = {"default": None, "passive": "PASSIVE", "active": "ACTIVE"}


def child(cfg: dict) -> dict:
    import asyncio
    import threading

    import torch

    from lmloop.engine import Engine, SamplingParams
    from lmloop.models.io import load_model

    lm = load_model(cfg["model"])
    ids = lm.tokenizer.encode(PROMPT)
    engine = Engine(
        lm.model, lm.tokenizer, max_batch=max(cfg["batches"]), max_len=512,
        threads=cfg["threads"], precision="int8" if cfg["int8"] else "fp32", single_thread_rows=cfg["single_thread_rows"],
    ).start()  # fmt: skip
    p = SamplingParams(max_tokens=cfg["new_tokens"], temperature=0, ignore_eos=True)

    def blocking(batch: int) -> float:
        firsts, counts = [0.0] * batch, [0] * batch

        def follow(i, handle):
            for out in handle:
                firsts[i] = firsts[i] or time.perf_counter()
                counts[i] += len(out.token_ids)

        handles = [engine.submit(ids, p) for _ in range(batch)]
        ts = [threading.Thread(target=follow, args=(i, h)) for i, h in enumerate(handles)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return (sum(counts) - batch) / (time.perf_counter() - max(firsts))

    def in_asyncio(batch: int) -> float:
        async def run() -> float:
            firsts, counts = [0.0] * batch, [0] * batch

            async def follow(i, handle):
                async for out in handle:
                    firsts[i] = firsts[i] or time.perf_counter()
                    counts[i] += len(out.token_ids)
                    json.dumps({"choices": [{"delta": {"content": out.text}, "index": i}]})

            handles = [engine.submit(ids, p) for _ in range(batch)]
            await asyncio.gather(*(follow(i, h) for i, h in enumerate(handles)))
            return (sum(counts) - batch) / (time.perf_counter() - max(firsts))

        return asyncio.run(run())

    consume = {"blocking": blocking, "asyncio": in_asyncio}[cfg["consumer"]]
    consume(1)  # warm-up
    out = {}
    for b in cfg["batches"]:
        rates = [consume(b) for _ in range(cfg["rounds"])]
        out[str(b)] = statistics.median(rates)
    engine.stop()
    out["omp_max_threads"] = torch.get_num_threads()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--policies", nargs="+", choices=list(POLICIES), default=["default", "passive"])
    ap.add_argument("--consumers", nargs="+", choices=["blocking", "asyncio"],
                    default=["blocking", "asyncio"])  # fmt: skip
    ap.add_argument("--modes", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    ap.add_argument("--single-thread-rows", type=int, nargs="+", default=[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    print(f"cpus {os.cpu_count()}; load {os.getloadavg()}", flush=True)
    results = []
    combos = [
        (mode, consumer, policy, k)
        for mode in args.modes
        for consumer in args.consumers
        for policy in args.policies
        for k in args.single_thread_rows
    ]
    for mode, consumer, policy, rows in combos:
        base = None
        for t in args.threads:
            cfg = {
                "model": args.model, "threads": t, "batches": args.batches,
                "int8": mode == "int8", "consumer": consumer, "new_tokens": args.new_tokens,
                "rounds": args.rounds, "single_thread_rows": rows,
            }  # fmt: skip
            env = {n: v for n, v in os.environ.items() if n != "OMP_WAIT_POLICY"}
            env.pop("LMLOOP_ENGINE_THREADS", None)
            if POLICIES[policy]:
                env["OMP_WAIT_POLICY"] = POLICIES[policy]
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(cfg)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            label = f"{mode:4s} {consumer:8s} {policy:7s} 1-thread<={rows} threads={t:2d}"
            if proc.returncode != 0:
                print(f"{label}: failed\n{proc.stderr[-800:]}")
                continue
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            base = base or got
            cells = "  ".join(
                f"B={b}: {got[str(b)]:7.1f} tok/s ({got[str(b)] / base[str(b)]:.2f}x)"
                for b in args.batches
            )
            print(f"{label}  {cells}", flush=True)
            results.append({"mode": mode, "consumer": consumer, "policy": policy,
                            "single_thread_rows": rows, "threads": t, **got})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
