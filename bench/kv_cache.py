"""The engine's KV cache in int8 against fp32: quality, decode speed, memory (issue 18, item 5).

    .venv/bin/python bench/kv_cache.py                       # SmolLM2-135M-Instruct
    .venv/bin/python bench/kv_cache.py --positions 256 --spans 128 1024

Quality: one text (WikiText-2's validation split from ../shared/data when it is there, else a
built-in paragraph repeated) is fed teacher-forced through the engine's fast runner: a short
prompt is prefilled, then every following true token is decoded one step at a time, so each
step's logits come from the cache. Each configuration (fp32 or int8 weights x fp32 or int8
cache) is compared with fp32 weights and an fp32 cache at the same positions: mean KL divergence
(nats per token) and top-1 agreement. The int8 cache's own cost is the int8-cache row against
the fp32-cache row of the same weights.

Speed: milliseconds per decode step at 1 and 16 rows, with every row's cache filled to each of
`--spans` tokens, for both caches (int8 weights, one thread). Memory: the cache's bytes at 16
rows x 2,048 slots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmloop.engine.fast import CALIBRATION_TEXT, FastLlamaRunner  # noqa: E402
from lmloop.models.io import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def text_ids(tok, n: int) -> tuple[list[int], str]:
    wiki = SHARED / "wikitext-2-raw" / "wiki.valid.raw"
    if wiki.is_file():
        text = wiki.read_text(encoding="utf-8")[:200_000]
        source = str(wiki)
    else:
        text = (CALIBRATION_TEXT + "\n") * 200
        source = "built-in paragraph"
    return tok.encode(text)[:n], source


def runner(model, tok, *, int8: bool, kv_int8: bool, batch: int, max_len: int):
    calib = [t for t in tok.encode(CALIBRATION_TEXT)] if int8 else None
    return FastLlamaRunner(model, batch, max_len, int8=int8, kv_int8=kv_int8, calibration_ids=calib)


def teacher_forced(r, ids: list[int], prompt: int) -> torch.Tensor:
    """Log-probabilities (steps, V) of each position after the prompt, decoded from the cache."""
    out = []
    with torch.inference_mode():
        out.append(r.prefill(0, ids[:prompt]))
        for p in range(prompt, len(ids) - 1):
            out.append(r.decode([ids[p]], [p])[0])
    return torch.log_softmax(torch.stack(out).float(), -1)


def step_ms(r, rows: int, span: int, steps: int) -> float:
    with torch.inference_mode():
        ids = [(7 * i) % 1000 + 10 for i in range(span)]
        for row in range(rows):
            r.prefill(row, ids)
        toks, pos = [11] * rows, [span] * rows
        for _ in range(3):
            r.decode(toks, pos)
        t0 = time.perf_counter()
        for _ in range(steps):
            r.decode(toks, pos)
        return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--positions", type=int, default=512, help="tokens of text, prompt included")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--spans", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ids, source = text_ids(tok, args.positions)
    print(f"model {args.model}; text {source}: {len(ids)} tokens, prompt {args.prompt}")
    print(f"cpus {os.cpu_count()}, 1 thread, load {os.getloadavg()}")

    ref = teacher_forced(
        runner(model, tok, int8=False, kv_int8=False, batch=1, max_len=len(ids)), ids, args.prompt
    )
    print("| weights | KV cache | mean KL to fp32/fp32 (nats/token) | top-1 agreement |")
    print("|---|---|--:|--:|")
    for int8 in (False, True):
        for kv_int8 in (False, True):
            r = runner(model, tok, int8=int8, kv_int8=kv_int8, batch=1, max_len=len(ids))
            lp = teacher_forced(r, ids, args.prompt)
            kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean()
            top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
            print(
                f"| {'int8' if int8 else 'fp32'} | {'int8' if kv_int8 else 'fp32'} | "
                f"{float(kl):.4f} | {float(top1) * 100:.1f}% |",
                flush=True,
            )

    print("\nms per decode step (int8 weights, 1 thread)")
    print("| rows | cache span | fp32 cache | int8 cache | int8 / fp32 |")
    print("|--:|--:|--:|--:|--:|")
    for rows in (1, 16):
        for span in args.spans:
            got = {}
            for kv_int8 in (False, True):
                r = runner(model, tok, int8=True, kv_int8=kv_int8, batch=rows, max_len=span + 8)
                got[kv_int8] = step_ms(r, rows, span, args.steps)
                del r
            print(
                f"| {rows} | {span} | {got[False]:.2f} | {got[True]:.2f} | "
                f"{got[True] / got[False]:.2f}x |",
                flush=True,
            )

    mem = {}
    for kv_int8 in (False, True):
        r = runner(model, tok, int8=False, kv_int8=kv_int8, batch=16, max_len=2048)
        r.allocate()
        mem[kv_int8] = (r.kv.nbytes + (0 if r.kv_scale is None else r.kv_scale.nbytes)) / 2**20
        del r
    print(
        f"\nKV cache at 16 rows x 2,048 slots: fp32 {mem[False]:.0f} MB, int8 {mem[True]:.0f} MB "
        f"({mem[False] / mem[True]:.2f}x less)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
