"""Engine-level decode throughput, no HTTP: what BENCHMARKS.md's engine A/B figures come from.

    PYTHONPATH=TREE .venv/bin/python bench/engine_rows.py    # one line of JSON, tok/s

Loads SmolLM2-135M at the engine's defaults (`EngineSpec(max_batch=16)`: int4 for the Q4_1
file), submits one chat prompt ("Write a short poem about the sea and the wind.") 16 times at
once (`s16`, sampled: temperature 0.8, top-p 0.95, a seed per request; best of 2 passes;
`g16` greedy, 1 pass) and once (`s1` best of 2, `g1`), 128 new tokens each (fewer where a
request ends). To compare two commits, run it from each commit's worktree in turn, alternating
(ABAB...), and compare medians: on this project's 2-core machine one run moves 10-25%.
`t16`: 16 threads each sending 8 requests one after another (64 sampled tokens, a prompt of
its own each), so new prompts arrive while the others decode, as a server's clients do.
"""

from __future__ import annotations

import json
import threading
import time

from lmloop.engine.core import load_engine
from lmloop.engine.params import SamplingParams
from lmloop.engine.spec import EngineSpec

SAMPLED = {"temperature": 0.8, "top_p": 0.95}
GREEDY = {"temperature": 0.0}


def main() -> None:
    eng, _ = load_engine("smollm2-135m-instruct", EngineSpec(max_batch=16))
    eng.start()
    ids = eng.encode_chat(
        [{"role": "user", "content": "Write a short poem about the sea and the wind."}]
    )

    def run(n: int, sampling: dict, tokens: int) -> float:
        t = time.perf_counter()
        hs = [
            eng.submit(ids, SamplingParams(max_tokens=tokens, seed=i, **sampling)) for i in range(n)
        ]
        done = sum(len(o.token_ids) for h in hs for o in h)
        return done / (time.perf_counter() - t)

    def staggered(clients: int, each: int) -> float:
        done: list[int] = []

        def client(i: int) -> None:
            for j in range(each):
                text = f"Write a short poem about the sea and the wind, number {i}-{j}."
                p = SamplingParams(max_tokens=64, seed=100 * i + j, **SAMPLED)
                h = eng.submit(eng.encode_chat([{"role": "user", "content": text}]), p)
                done.append(sum(len(o.token_ids) for o in h))

        t = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return sum(done) / (time.perf_counter() - t)

    try:
        run(16, SAMPLED, 16)  # warm-up
        res = {
            "s16": max(run(16, SAMPLED, 128) for _ in range(2)),
            "g16": run(16, GREEDY, 128),
            "s1": max(run(1, SAMPLED, 128) for _ in range(2)),
            "g1": run(1, GREEDY, 128),
            "t16": staggered(16, 8),
        }
    finally:
        eng.stop()
    print(json.dumps({k: round(v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
