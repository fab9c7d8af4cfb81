"""Decode speed: lmloop's engine (fp32, int8) vs transformers `generate` vs llama.cpp.

    .venv/bin/python bench/generate.py                      # SmolLM2-135M, 128 new tokens
    .venv/bin/python bench/generate.py --threads 1 --batches 1,4,16

Same weights everywhere (SmolLM2-135M-Instruct from the installed GGUF; transformers gets a
`LlamaForCausalLM` holding exactly our dequantized weights; llama.cpp reads the GGUF file itself,
Q4_1, when `llama_cpp` is importable, i.e. after `make bench-setup`). Same prompt, greedy,
128 new tokens, end-of-sequence ignored (transformers: `min_new_tokens`). Prefill tok/s = prompt
tokens / time to the first new token; decode tok/s = the remaining new tokens / the time after
the first. Then our aggregate decode throughput with 1, 4 and 16 concurrent sequences.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived a curious "
    "girl who loved to explore. One morning she found a strange map under her bed, and"
)


def ours(engine, ids, n):
    from lmloop.engine import SamplingParams

    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    first = None
    count = 0
    for out in engine.generate(ids, p):
        first = first or time.perf_counter()
        count += len(out.token_ids)
    t1 = time.perf_counter()
    return _rates(len(ids), count, t0, first, t1)


def _rates(prompt_n, new_n, t0, first, t1):
    return {
        "prefill_tok_s": prompt_n / (first - t0),
        "decode_tok_s": (new_n - 1) / (t1 - first),
        "new_tokens": new_n,
    }


def hf_generate(model, ids, n):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
            pad_token_id=0,
        )  # fmt: skip
    t1 = time.perf_counter()
    new = out.shape[1] - len(ids)
    return _rates(len(ids), new, t0, clock.times[1], t1)  # times[0]: the prompt itself


def llama_cpp_run(path, ids, n, threads):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False
    )
    t0 = time.perf_counter()
    first, count = None, 0
    for _tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        first = first or time.perf_counter()
        count += 1
        if count >= n:
            break
    t1 = time.perf_counter()
    return _rates(len(ids), count, t0, first, t1)


def aggregate(engine, ids, n, batch):
    import threading

    from lmloop.engine import SamplingParams

    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.start()
    firsts, counts = [0.0] * batch, [0] * batch

    def follow(i, handle):
        for out in handle:
            firsts[i] = firsts[i] or time.perf_counter()
            counts[i] += len(out.token_ids)

    t0 = time.perf_counter()
    handles = [engine.submit(ids, p) for _ in range(batch)]
    threads = [threading.Thread(target=follow, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    start = max(firsts)  # every sequence is decoding from here on
    total = sum(counts)
    return {
        "batch": batch,
        "decode_tok_s": (total - batch) / (t1 - start),
        "end_to_end_tok_s": total / (t1 - t0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for every contender (0: the engine default)",
    )
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    args = ap.parse_args()
    from lmloop.engine import Engine
    from lmloop.engine.core import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)  # transformers runs in this thread
    from lmloop.models.io import load_model

    lm = load_model(args.model)
    ids = lm.tokenizer.encode(PROMPT)
    n = args.new_tokens
    batches = [int(b) for b in args.batches.split(",") if b]
    results: dict = {"model": lm.name, "prompt_tokens": len(ids), "threads": threads}
    kw = {"max_batch": max(batches), "max_len": 512, "threads": threads}
    fp32 = Engine(lm.model, lm.tokenizer, **kw)
    int8 = Engine(lm.model, lm.tokenizer, precision="int8", **kw)
    runs = {
        "lmloop_fp32": lambda: ours(fp32, ids, n),
        "lmloop_int8": lambda: ours(int8, ids, n),
    }
    if not args.skip_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        from lmloop.models.adapter import llama_config_to_hf, llama_state_to_hf

        cfg = lm.model.config
        hf = LlamaForCausalLM(LlamaConfig(**llama_config_to_hf(cfg))).eval()
        hf.load_state_dict(llama_state_to_hf(lm.model.state_dict(), cfg), strict=False)
        hf.tie_weights()
        runs["transformers_fp32"] = lambda: hf_generate(hf, ids, n)
    try:
        import llama_cpp  # noqa: F401

        runs["llama_cpp_q4_1"] = lambda: llama_cpp_run(lm.path, ids, n, threads)
    except ImportError:
        results["llama_cpp_q4_1"] = "skipped: llama_cpp not importable (make bench-setup)"
        print("llama.cpp skipped (not installed)", flush=True)
    # Warm up, then interleave the contenders round by round, so a load change on the shared
    # machine hits them all alike; report each one's median round.
    ours(fp32, ids[:8], 4), ours(int8, ids[:8], 4)
    if "transformers_fp32" in runs:
        hf_generate(hf, ids[:8], 4)
    samples: dict = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            samples[name].append(fn())
            print(f"round {r + 1} {name}", samples[name][-1], flush=True)
    for name, got in samples.items():
        got = sorted(got, key=lambda x: x["decode_tok_s"])
        results[name] = {**got[len(got) // 2], "decode_tok_s_all": [x["decode_tok_s"] for x in got]}
    for name, eng in (("fp32", fp32), ("int8", int8)):
        agg = []
        for b in batches:
            agg.append(aggregate(eng, ids, n, b))
            print(f"aggregate {name}", agg[-1], flush=True)
        results[f"aggregate_{name}"] = agg
        eng.stop()
    base = results["lmloop_fp32"]["decode_tok_s"]
    ratios = {}
    if isinstance(results.get("transformers_fp32"), dict):
        hf_rate = results["transformers_fp32"]["decode_tok_s"]
        ratios["fp32_vs_transformers"] = base / hf_rate
        ratios["int8_vs_transformers"] = results["lmloop_int8"]["decode_tok_s"] / hf_rate
    if isinstance(results.get("llama_cpp_q4_1"), dict):
        ratios["int8_vs_llama_cpp"] = (
            results["lmloop_int8"]["decode_tok_s"] / results["llama_cpp_q4_1"]["decode_tok_s"]
        )
    for name in ("fp32", "int8"):
        agg = {a["batch"]: a["decode_tok_s"] for a in results[f"aggregate_{name}"]}
        if 1 in agg:
            for b, v in agg.items():
                ratios[f"{name}_aggregate_{b}_vs_1"] = v / agg[1]
    results["ratios"] = ratios
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
