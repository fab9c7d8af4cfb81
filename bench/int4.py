"""4-bit weights (`--int4`) against int8 and fp32: quality and batch-1 decode speed (issue 18).

    .venv/bin/python bench/int4.py                       # SmolLM2-135M-Instruct
    .venv/bin/python bench/int4.py --threads 1 2 --spans 128 1024

Quality, as bench/kv_cache.py measures it: one text (WikiText-2's validation split from
../shared/data when it is there, else a built-in paragraph) is fed teacher-forced through the
fast runner, a short prompt prefilled and every following token decoded one step at a time
from the cache, so each step runs the batch-1 decode path being measured. Each configuration
is compared with fp32 weights and an fp32 cache at the same positions: mean KL divergence
(nats per token) and top-1 agreement. Prompts too: 10 chat prompts (the model's template) and 10
200-token stretches of the same text, prefilled at once (several rows per projection, where
int8 activations share one quantization scale unless rows are scaled first), every prompt
position against fp32.

Prompts are measured twice in one run, with int8 rows scaled to one magnitude before fbgemm's
single-scale quantization (the engine's way, `fast.scale_rows`) and without (the control): the
KL table, then milliseconds per 1,000-token prompt and per 16-row decode step for both.

One projection: microseconds per call of a 3,072 x 576 projection at one row, one thread,
cycling through 30 such weights so none stays in L2: the 4-bit kernel against fbgemm's int8.

Speed: milliseconds per batch-1 decode step with the cache filled to each of `--spans` tokens,
per thread count, for int8 weights (fbgemm projections, torch ops around them, attention in C:
`_decode_rows`), 4-bit weights op by op (the same, with the 4-bit linears swapped in) and
4-bit weights through the fused step (`_decode_fused`: five C calls a layer). The served
comparison with llama-server is bench/serve.py's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_cache import teacher_forced, text_ids  # noqa: E402

from lmloop.engine import fast  # noqa: E402
from lmloop.engine.fast import CALIBRATION_TEXT, FastLlamaRunner, Int8Linear  # noqa: E402
from lmloop.engine.kernels import Q4Linear  # noqa: E402
from lmloop.models.io import load_model  # noqa: E402

MODES = {  # name: (runner keywords, fused batch-1 step)
    "fp32": ({}, False),
    "int8": ({"int8": True}, False),
    "int4 op by op": ({"int4": True}, False),
    "int4 fused": ({"int4": True}, True),
}


def runner(model, tok, mode: str, *, kv_int8: bool, max_len: int) -> FastLlamaRunner:
    kw, fused = MODES[mode]
    calib = tok.encode(CALIBRATION_TEXT) if kw else None
    r = FastLlamaRunner(model, 1, max_len, kv_int8=kv_int8, calibration_ids=calib, **kw)
    r.fuse_one = fused
    return r


QUESTIONS = [
    "What is the capital of France?", "Give me three tips for learning to cook.",
    "What is 12 times 3?", "Name the primary colors.", "Who wrote Romeo and Juliet?",
    "Translate 'good morning' to Spanish.", "Write a short poem about the sea.",
    "Explain what a language model is in two sentences.",
    "How do plants make food from sunlight?", "Tell me a story about a brave mouse.",
]  # fmt: skip


def prefill_quality(model, tok, mode: str, prompts: list[list[int]], ref: list) -> str:
    r = runner(model, tok, mode, kv_int8=mode != "fp32", max_len=max(map(len, prompts)) + 1)
    kls, top = [], []
    with torch.inference_mode():
        for p, want in zip(prompts, ref):
            lp = torch.log_softmax(r.prefill(0, p, every_position=True).float(), -1)
            kls.append(F.kl_div(lp, want, log_target=True, reduction="none").sum(-1).mean())
            top.append((lp.argmax(-1) == want.argmax(-1)).float().mean())
    kl, agree = float(torch.stack(kls).mean()), float(torch.stack(top).mean()) * 100
    return f"| {mode} | {kl:.4f} | {agree:.1f}% |"


def unscaled(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The control: every input quantized with one scale, as fbgemm alone does."""
    return x, None


def best_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def rows_ms(model, tok) -> tuple[float, float]:
    """(ms per 1,000-token prompt, ms per 16-row decode step at ~100 slots), int8, 2 threads."""
    r = runner(model, tok, "int8", kv_int8=True, max_len=1100)
    r16 = FastLlamaRunner(model, 16, 160, int8=True, kv_int8=True,
                          calibration_ids=tok.encode(CALIBRATION_TEXT))  # fmt: skip
    ids = [(7 * i) % 1000 + 10 for i in range(1000)]
    with torch.inference_mode():
        prompt = best_ms(lambda: r.prefill(0, ids))
        for row in range(16):
            r16.prefill(row, ids[: 90 + row])
        pos = [90 + row for row in range(16)]
        step = best_ms(lambda: r16.decode([11] * 16, pos), reps=15)
    return prompt, step


def projection_us() -> dict[str, float]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3072, 576, generator=g) for _ in range(30)]
    x = torch.randn(1, 576, generator=g)
    out = {}
    for name, cls in (("4-bit kernel", Q4Linear), ("fbgemm int8", Int8Linear)):
        layers = [cls(w, None) for w in weights]
        out[name] = best_ms(lambda fs=layers: [f(x) for f in fs], reps=7) / len(layers) * 1e3
    return out


def step_ms(r, span: int, steps: int) -> float:
    with torch.inference_mode():
        r.prefill(0, [(7 * i) % 1000 + 10 for i in range(span)])
        times = []
        for k in range(steps + 3):
            t0 = time.perf_counter()
            r.decode([11], [span + k])
            times.append(time.perf_counter() - t0)
        return statistics.median(times[3:]) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--positions", type=int, default=512, help="tokens of text, prompt included")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--spans", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ids, source = text_ids(tok, args.positions)
    print(f"model {args.model}; text {source}: {len(ids)} tokens, prompt {args.prompt}")
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()}")

    torch.set_num_threads(1)
    ref = teacher_forced(runner(model, tok, "fp32", kv_int8=False, max_len=len(ids)), ids, 32)
    print("| weights | KV cache | mean KL to fp32/fp32 (nats/token) | top-1 agreement |")
    print("|---|---|--:|--:|")
    for mode in ("int8", "int4 op by op", "int4 fused"):
        r = runner(model, tok, mode, kv_int8=True, max_len=len(ids))
        lp = teacher_forced(r, ids, args.prompt)
        kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean()
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
        print(f"| {mode} | int8 | {float(kl):.4f} | {float(top1) * 100:.1f}% |", flush=True)

    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS
    ]
    text, _ = text_ids(tok, 20 * 300)
    prompts += [text[i * 300 : i * 300 + 200] for i in range(10) if len(text) >= i * 300 + 200]
    r = runner(model, tok, "fp32", kv_int8=False, max_len=max(map(len, prompts)) + 1)
    with torch.inference_mode():
        ref = [torch.log_softmax(r.prefill(0, p, every_position=True).float(), -1) for p in prompts]
    print(f"\nprompts: {len(prompts)} prefilled at once, every position against fp32")
    print("| weights (prompts run int8 in both int modes) | mean KL (nats/token) | top-1 |")
    print("|---|--:|--:|")
    print(prefill_quality(model, tok, "int8", prompts, ref), flush=True)
    scale_rows = fast.scale_rows
    fast.scale_rows = unscaled
    try:
        print(
            prefill_quality(model, tok, "int8", prompts, ref).replace(
                "int8", "int8, rows not scaled"
            )
        )
        torch.set_num_threads(2)
        plain = rows_ms(model, tok)
    finally:
        fast.scale_rows = scale_rows
    scaled = rows_ms(model, tok)
    print("\nint8, 2 threads | rows scaled | not scaled (control)")
    print("|---|--:|--:|")
    print(f"| ms per 1,000-token prompt | {scaled[0]:.1f} | {plain[0]:.1f} |")
    print(f"| ms per 16-row decode step | {scaled[1]:.2f} | {plain[1]:.2f} |", flush=True)

    us = projection_us()
    print("\nus per 3,072 x 576 projection, one row, one thread, 30 weights cycled")
    print(" | ".join(f"{k} {v:.1f}" for k, v in us.items()), flush=True)

    print("\nms per batch-1 decode step (int8 cache; median of --steps)")
    print("| threads | cache span | int8 | int4 op by op | int4 fused | int8 / int4 fused |")
    print("|--:|--:|--:|--:|--:|--:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for span in args.spans:
            got = {}
            for mode in ("int8", "int4 op by op", "int4 fused"):
                r = runner(model, tok, mode, kv_int8=True, max_len=span + args.steps + 8)
                got[mode] = step_ms(r, span, args.steps)
                del r
            print(
                f"| {threads} | {span} | {got['int8']:.2f} | {got['int4 op by op']:.2f} | "
                f"{got['int4 fused']:.2f} | {got['int8'] / got['int4 fused']:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
