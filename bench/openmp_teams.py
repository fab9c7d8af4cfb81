"""Batch-1 decode with 2 engine threads while another thread's OpenMP team is alive (issue 18).

    .venv/bin/python bench/openmp_teams.py                 # SmolLM2-135M-Instruct, --int8

libgomp gives a thread a team of worker threads at its first parallel op, kept while the thread
lives; with more pool threads alive than cores it throttles spin-waiting. Three cases, each in
a fresh process: the decoding thread's team alone; another live thread that ran a parallel op
first (what loading a model in an executor thread did); the same, after that thread released
its team with `lmloop.engine.threads.release_openmp_team` (what `Engine.start` now does).
Reported: milliseconds per batch-1 decode step (int8 weights, int8 KV cache, 100 steps).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ("alone", "other-team", "other-team-released")


def run_case(case: str, model: str, threads: int, steps: int) -> float:
    import torch

    from lmloop.engine.core import _make_runner
    from lmloop.engine.threads import release_openmp_team
    from lmloop.models.io import load_model

    loaded = load_model(model)
    ready, stop = threading.Event(), threading.Event()

    def other() -> None:  # a thread that ran a parallel op and lives on
        torch.set_num_threads(threads)
        torch.randn(1 << 22).exp_()
        if case == "other-team-released":
            release_openmp_team()
        ready.set()
        stop.wait()

    if case != "alone":
        threading.Thread(target=other, daemon=True).start()
        ready.wait()
    torch.set_num_threads(threads)
    r = _make_runner(
        loaded.model, 1, 2048, fast=True, int8=True, kv_int8=True, tokenizer=loaded.tokenizer
    )
    ids = loaded.tokenizer.encode("The history of science is the study of how people came to")
    with torch.inference_mode():
        r.prefill(0, ids)
        for i in range(5):
            r.decode([5], [len(ids) + i])
        t0 = time.perf_counter()
        for i in range(steps):
            r.decode([5], [len(ids) + 5 + i])
    stop.set()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child
    args = ap.parse_args()
    if args.case:
        print(f"{run_case(args.case, args.model, args.threads, args.steps):.2f}")
        return 0
    print(f"model {args.model}, {args.threads} threads, {args.steps} batch-1 decode steps")
    print("| case | ms per step |\n|---|--:|")
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--case", case, "--model", args.model,
             "--threads", str(args.threads), "--steps", str(args.steps)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        print(f"| {case} | {out.stdout.strip().splitlines()[-1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
