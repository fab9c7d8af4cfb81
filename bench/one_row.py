"""Where a decode step's time goes against what memory allows (issue 28's one-client floor).

    PYTHONPATH=$PWD .venv/bin/python bench/one_row.py      # one line of JSON

Loads SmolLM2-135M at the engine's defaults (int4 for the Q4_1 file) and prints, medians of
repeated calls on the engine's 2 threads: this machine's read bandwidth (`torch.sum` over 256
MB, 1 and 2 threads); the bytes one decode step reads (the 4-bit layers and the int8 head); a
whole decode step at 1 and 16 rows (the 30 layers in one C call, then the head; no sampling, no
engine around it); and the head alone (called again and again, much of its 28 MB stays in the
last-level cache: a lower bound of its share of a step). Bytes over bandwidth is the floor of
a one-row step; the peer's time per token over that floor caps the one-client ratio.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from lmloop.engine.core import load_engine
from lmloop.engine.spec import EngineSpec


def median_ms(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)


def main() -> None:
    res: dict[str, float] = {}
    x = torch.ones(64 * 1024 * 1024)  # 256 MB
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x.sum()
        res[f"read_GBps_{threads}thr"] = round(x.numel() * 4 / median_ms(x.sum, 10) / 1e6, 1)
    del x
    eng, _ = load_engine("smollm2-135m-instruct", EngineSpec(max_batch=16))
    r = eng.runner
    r.allocate()
    torch.set_num_threads(2)
    layers = sum(q.codes.numel() + q.scales.numel() * q.scales.element_size()
                 for lin in r.layers4 for q in lin)  # fmt: skip
    res["layer_MB"] = round(layers / 1e6, 1)
    res["head_MB"] = round(r.lm_head.qweight.numel() / 1e6, 1)
    for n in (1, 16):
        hidden = torch.randn(n, r.lm_head.in_features)
        toks, pos = [100] * n, [50] * n
        res[f"step_ms_{n}"] = median_ms(lambda t=toks, p=pos: r.decode(t, p), 300)
        res[f"head_ms_{n}"] = median_ms(lambda x=hidden: r.lm_head(x), 300)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
