"""Decode speed: lmloop's engine (fp32, int8, int4) vs transformers `generate` vs llama.cpp.

    .venv/bin/python bench/generate.py                      # SmolLM2-135M, 128 new tokens
    .venv/bin/python bench/generate.py --threads 1 --batches 1,4,16
    .venv/bin/python bench/generate.py --sampling 16     # sampled vs greedy, prefill together
    .venv/bin/python bench/generate.py --skip-hf --modes int8,int4 --batches 1,16 --rounds 2

Same weights everywhere (SmolLM2-135M-Instruct from the installed GGUF; transformers gets a
`LlamaForCausalLM` holding exactly our dequantized weights; llama.cpp reads the GGUF file itself,
Q4_1, when `llama_cpp` is importable, i.e. after `make bench-setup`). Same prompt, greedy,
128 new tokens, end-of-sequence ignored (transformers: `min_new_tokens`). Prefill tok/s = prompt
tokens / time to the first new token; decode tok/s = the remaining new tokens / the time after
the first. Then our aggregate decode throughput with 1, 4 and 16 concurrent sequences.

`--sampling B` measures instead, on our int8 engine with B concurrent sequences, in interleaved
rounds: greedy decode, sampled decode (temperature 0.8, top-k 40, top-p 0.95, a seed each) with
the batched sampler and with the one-row-at-a-time one it replaced, and the time to every first
token of B different prompts submitted together, prefilled in one forward or one at a time.
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


SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95)


def decode_rate(engine, prompts, n, sampled: bool) -> float:
    """Aggregate decode tok/s of len(prompts) sequences decoding side by side."""
    from lmloop.engine import SamplingParams

    def params(i):
        extra = dict(SAMPLED, seed=i) if sampled else dict(temperature=0)
        return SamplingParams(max_tokens=n, ignore_eos=True, **extra)

    import threading

    engine.start()
    handles = [engine.submit(p, params(i)) for i, p in enumerate(prompts)]
    firsts, ends = [0.0] * len(handles), [0.0] * len(handles)

    def follow(i, handle):
        for _ in handle:
            firsts[i] = firsts[i] or time.perf_counter()
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=follow, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(prompts) * (n - 1) / (max(ends) - max(firsts))


def first_tokens(engine, prompts) -> float:
    """Seconds from submitting the prompts together to the last of their first tokens."""
    from lmloop.engine import SamplingParams

    p = SamplingParams(max_tokens=1, temperature=0)
    engine.stop()  # queued while the worker is stopped: admitted in one step
    t0 = time.perf_counter()
    handles = [engine.submit(q, p) for q in prompts]
    engine.start()
    for h in handles:
        h.result()
    return time.perf_counter() - t0


def sampling_main(lm, ids, args, threads) -> None:
    from lmloop.engine import Engine
    from lmloop.engine.sampling import pick_batch, pick_rows

    B, n = args.sampling, args.new_tokens
    words = PROMPT.split()
    # B different prompts of different lengths (the prefix cache off: nothing is reused)
    prompts = [lm.tokenizer.encode(" ".join(words[i % 7 :][: 12 + 2 * i])) for i in range(B)]
    engine = Engine(
        lm.model, lm.tokenizer, int8=True, max_batch=B, max_len=512, threads=threads,
        prefix_cache_mb=0,
    )  # fmt: skip
    decode_rate(engine, prompts, 8, True)  # warm up

    def sampled(fn):
        def run():
            engine.sample = fn
            try:
                return decode_rate(engine, prompts, n, True)
            finally:
                engine.sample = pick_batch

        return run

    def prefill(together):
        def run():
            engine.batch_prefill = together
            try:
                return first_tokens(engine, prompts)
            finally:
                engine.batch_prefill = True

        return run

    runs = {
        "greedy_tok_s": lambda: decode_rate(engine, prompts, n, False),
        "sampled_batched_tok_s": sampled(pick_batch),
        "sampled_per_row_tok_s": sampled(pick_rows),
        "prefill_together_s": prefill(True),
        "prefill_one_by_one_s": prefill(False),
    }
    samples: dict = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            samples[name].append(fn())
            print(f"round {r + 1} {name} {samples[name][-1]:.3f}", flush=True)
    engine.stop()
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    results = {
        "model": lm.name, "threads": threads, "batch": B, "new_tokens": n,
        "prompt_tokens": [len(p) for p in prompts], "sampled": SAMPLED, "median": med,
        "all": samples,
        "sampled_batched_vs_greedy": med["sampled_batched_tok_s"] / med["greedy_tok_s"],
        "sampled_per_row_vs_greedy": med["sampled_per_row_tok_s"] / med["greedy_tok_s"],
        "prefill_speedup": med["prefill_one_by_one_s"] / med["prefill_together_s"],
    }  # fmt: skip
    print(json.dumps(results, indent=2))


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
    ap.add_argument(
        "--sampling",
        type=int,
        default=0,
        metavar="B",
        help="only compare sampled and greedy decode and batched prefill at B sequences",
    )
    ap.add_argument("--modes", default="fp32,int8", help="our weight precisions (fp32,int8,int4)")
    args = ap.parse_args()
    from lmloop.engine import Engine
    from lmloop.engine.core import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)  # transformers runs in this thread
    from lmloop.models.io import load_model

    lm = load_model(args.model)
    ids = lm.tokenizer.encode(PROMPT)
    if args.sampling:
        return sampling_main(lm, ids, args, threads)
    n = args.new_tokens
    batches = [int(b) for b in args.batches.split(",") if b]
    results: dict = {"model": lm.name, "prompt_tokens": len(ids), "threads": threads}
    kw = {"max_batch": max(batches), "max_len": 512, "threads": threads}
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"fp32", "int8", "int4"}:
        raise SystemExit(f"--modes: fp32, int8 or int4, not {args.modes}")
    engines = {m: Engine(lm.model, lm.tokenizer, **kw, precision=m) for m in modes}
    runs = {f"lmloop_{m}": (lambda e=e: ours(e, ids, n)) for m, e in engines.items()}
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
    for e in engines.values():
        ours(e, ids[:8], 4)
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
    for name, eng in engines.items():
        agg = []
        for b in batches:
            agg.append(aggregate(eng, ids, n, b))
            print(f"aggregate {name}", agg[-1], flush=True)
        results[f"aggregate_{name}"] = agg
        eng.stop()
    ratios = {}
    for peer, short in (("transformers_fp32", "transformers"), ("llama_cpp_q4_1", "llama_cpp")):
        if isinstance(results.get(peer), dict):
            for m in modes:
                ratios[f"{m}_vs_{short}"] = (
                    results[f"lmloop_{m}"]["decode_tok_s"] / results[peer]["decode_tok_s"]
                )
    for name in modes:
        agg = {a["batch"]: a["decode_tok_s"] for a in results[f"aggregate_{name}"]}
        if 1 in agg:
            for b, v in agg.items():
                ratios[f"{name}_aggregate_{b}_vs_1"] = v / agg[1]
    results["ratios"] = ratios
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
