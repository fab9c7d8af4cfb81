"""GGUF export checked against llama.cpp: same greedy tokens, and decode speed side by side.

    .venv/bin/python bench/export_llamacpp.py [--model smollm2-135m-instruct] [--tokens 32]

Exports `--model` with `lmloop export --format gguf` (F32), loads the file with
llama-cpp-python, and decodes the same prompt token ids greedily in both lmloop (our Llama, KV
cache) and llama.cpp, printing both token lists, whether they match, and tokens/s for each with
the ratio. llama-cpp-python is installed only by `make bench-setup` (it compiles for a long
while); without it this script says so and exits 0 without measuring anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmloop.export.config import ExportConfig
from lmloop.models.io import load_model
from lmloop.stages.export import run as export_run


def ours_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    cache = model.new_cache(1, len(ids) + n)
    out: list[int] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        pos = torch.arange(len(ids))[None]
        logits = model(torch.tensor([ids]), positions=pos, cache=cache)
        for i in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            p = torch.tensor([[len(ids) + i]])
            logits = model(torch.tensor([[nxt]]), positions=p, cache=cache)
    return out, time.perf_counter() - t0


def llamacpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    import numpy as np

    llm.reset()
    out: list[int] = []
    t0 = time.perf_counter()
    llm.eval(ids)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    if importlib.util.find_spec("llama_cpp") is None:
        print("skipped: llama_cpp is not installed (run `make bench-setup` to build it)")
        return 0
    from llama_cpp import Llama

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    ids = tok.encode(prompt)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        export_run(ExportConfig(model=args.model, out=str(path), format="gguf"))
        llm = Llama(
            model_path=str(path),
            n_ctx=len(ids) + args.tokens + 8,
            n_threads=args.threads,
            logits_all=True,
            verbose=False,
        )
        theirs, t_theirs = llamacpp_greedy(llm, ids, args.tokens)
        # llama.cpp's own tokenizer on the same text (reported, not required to match)
        cpp_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        del llm
    ours, t_ours = ours_greedy(lm.model, ids, args.tokens)
    same = ours == theirs
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    print(f"model {args.model}: prompt {len(ids)} tokens, {args.tokens} greedy tokens")
    print(f"tokenizer ids equal to llama.cpp's: {cpp_ids == ids}")
    print(f"lmloop   : {ours}\n           {tok.decode(ours)!r}")
    print(f"llama.cpp: {theirs}\n           {tok.decode(theirs)!r}")
    print(f"greedy tokens equal: {same}" + ("" if same else f" (first difference at {first_diff})"))
    r_ours, r_theirs = args.tokens / t_ours, args.tokens / t_theirs
    print(
        f"decode (prefill + {args.tokens} tokens, {args.threads} threads, fp32): "
        f"lmloop {r_ours:.1f} tok/s, llama.cpp {r_theirs:.1f} tok/s, "
        f"ratio lmloop/llama.cpp {r_ours / r_theirs:.2f}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
