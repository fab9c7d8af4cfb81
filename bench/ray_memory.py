"""Benchmark: memory per Ray worker of `lmloop data --engine ray` as the corpus grows (issue 17).

For each size, a child process starts a local Ray cluster of 2 CPUs and runs the Ray path on
`bench/prepare_scale.py`'s corpus (../shared/data as JSONL, one ~11.8 MB file per copy, each
copy's documents numbered so near dedup, not exact dedup, removes them), with SmolLM2's
tokenizer, no split and no decontamination. A sampler thread reads the driver and every Ray
worker four times a second: RSS, and from `/proc/PID/smaps` (psutil `memory_full_info`,
`memory_maps`) USS (pages only this process holds), PSS (shared pages divided among their
users) and the resident part of the object store's mapping (`/dev/shm/plasma*`). RSS counts
every store page a worker has touched to read a task's arguments or write its results, and
they stay counted after the object is freed: pages of the node's store (one copy, whatever
the number of workers, capped by its size), not of the worker. "own" is USS less the store
pages only this worker has touched: its heap, what it alone holds. Each peak is also listed by the task the worker
was running then (Ray titles a busy worker `ray::<task>`).

    .venv/bin/python bench/ray_memory.py                 # 11.8 and 47.1 MB (1x and 4x)
    .venv/bin/python bench/ray_memory.py --mb 11,44,88
    .venv/bin/python bench/ray_memory.py --lines         # a line a document: dedup tables grow
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

FIELDS = ("rss", "own", "pss", "store")


class Watch:
    """Peak RSS/own/PSS (MB) of the driver and of each Ray worker, and by running task: `store`
    is the part of RSS in the object store's mapping (`/dev/shm/plasma*`), `own` is USS less
    the store pages that only this process has touched (smaps counts those as private)."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.psutil, self.every = psutil, every
        self.me = psutil.Process()
        self.driver = dict.fromkeys(FIELDS, 0.0)
        self.workers: dict[int, dict[str, float]] = {}
        self.tasks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()

    def sample(self) -> None:
        try:
            procs = self.me.children(recursive=True)
        except self.psutil.Error:
            procs = []
        self._peak(self.driver, self.me)
        for p in procs:
            try:
                title = (p.cmdline() or [""])[0]
            except self.psutil.Error:
                continue
            if not title.startswith("ray::") or title.endswith("Agent"):  # not a worker
                continue
            m = self._peak(self.workers.setdefault(p.pid, dict.fromkeys(FIELDS, 0.0)), p)
            if m:
                task = self.tasks.setdefault(title[5:].split()[0], dict.fromkeys(FIELDS, 0.0))
                for k in FIELDS:
                    task[k] = max(task[k], m[k])

    def _peak(self, into: dict[str, float], p) -> dict[str, float] | None:
        try:
            info = p.memory_full_info()
            store = [mp for mp in p.memory_maps() if "/plasma" in mp.path]
        except self.psutil.Error:
            return None
        private = sum(mp.private_clean + mp.private_dirty for mp in store)
        m = {"rss": info.rss, "own": info.uss - private, "pss": info.pss}
        m = {k: v / 1e6 for k, v in m.items()} | {"store": sum(mp.rss for mp in store) / 1e6}
        for k in FIELDS:
            into[k] = max(into[k], m[k])
        return m

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> dict:
    import ray

    import lmloop.stages.data  # noqa: F401 - imported before the watch
    from lmloop.cli import main
    from lmloop.data.shards import read_data_meta

    os.environ["LMLOOP_NO_PROGRESS"] = "1"
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
    argv = ["data", "--source", args.corpus, "--out", args.out, "--tokenizer", args.tokenizer,
            "val_fraction=0", "test_fraction=0", "decontaminate=false", "engine=ray"]  # fmt: skip
    with Watch() as w:
        t0 = time.perf_counter()
        assert main(argv) == 0
        seconds = time.perf_counter() - t0
    ray.shutdown()
    meta = read_data_meta(args.out)
    return {
        "seconds": seconds,
        "driver": w.driver,
        "workers": list(w.workers.values()),
        "tasks": w.tasks,
        "tokens": meta["splits"]["train"]["tokens"],
        "removed": meta["removed"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--mb", default="11,44", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--lines", action="store_true", help="each line a document (many, short)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--corpus")
    ap.add_argument("--tokenizer")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from prepare_scale import make_corpus, smollm2_tokenizer

    work = Path(tempfile.mkdtemp(prefix="lmloop-bench-raymem-"))
    rows = []
    try:
        tok = smollm2_tokenizer(work / "tokenizer")
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for size in args.mb.split(","):
            corpus = work / f"corpus-{size}"
            mb, files = make_corpus(Path(args.data), corpus, float(size), args.lines)
            cmd = [sys.executable, __file__, "--child", "--workers", str(args.workers),
                   "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(work / "o")]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            shutil.rmtree(work / "o", ignore_errors=True)
            shutil.rmtree(corpus, ignore_errors=True)
            if proc.returncode != 0:
                raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((mb, files, r))
            print(f"  {mb:.1f} MB ({files} files): {r['seconds']:.1f} s, "
                  f"{r['tokens']:,} tokens", flush=True)  # fmt: skip
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'corpus':>9} | largest Ray worker: RSS (store) / own / PSS | driver RSS / own")
    for mb, _, r in rows:
        top = {k: max(w[k] for w in r["workers"]) for k in FIELDS}
        d = r["driver"]
        print(f"{mb:7.1f}MB | {top['rss']:14.0f} ({top['store']:4.0f}) / {top['own']:4.0f} / "
              f"{top['pss']:4.0f} MB | {d['rss']:6.0f} / {d['own']:4.0f} MB")  # fmt: skip
    print("\npeak own (RSS) of a worker while running each task, MB (the worker's earlier tasks'")
    print("heap included: a worker's allocator keeps its high-water mark, ~20 tasks to settle)")
    names = sorted({t for *_, r in rows for t in r["tasks"]})
    print(f"{'task':<20}" + "".join(f"{mb:>16.1f}MB" for mb, *_ in rows))
    for t in names:
        cells = []
        for *_, r in rows:
            m = r["tasks"].get(t)
            cells.append(f"{m['own']:>8.0f} ({m['rss']:4.0f})" if m else f"{'-':>15}")
        print(f"{t:<20}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
