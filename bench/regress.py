"""Two commits' speed in one run: did a change (the layout refactor, issue 26) slow anything down?

    .venv/bin/python bench/regress.py --old fc353da --new HEAD
    .venv/bin/python bench/regress.py --old fc353da --new HEAD --only generate --rounds 2

Each commit is checked out into a detached git worktree under a temporary folder, and each bench
runs from its own tree (that tree's script, that tree's `lmloop` on PYTHONPATH), old then new
then new then old (ABBA), so a drift of the machine's speed, or a cost of going second, hits
both alike:

- `train_throughput`: the `lmloop train` loop's ms/step (fp32, the bench's tiny Llama: vocab
  8,192, hidden 256, 4 layers, seq 256, batch 8), and its three peers' (the script runs them all;
  their figures show whether the machine held still between the two commits);
- `generate`: the engine's decode tok/s on the SmolLM2-135M GGUF in fp32 and int8 (what both
  commits have), one sequence, and 16 together; no transformers;
- `serve`: `lmloop serve --int8` on loopback, streaming chat at 1 and 16 clients (32 requests of
  64 tokens a level), aggregate tok/s. The workload is the OLD tree's `bench/serve.py` for both
  commits (only `lmloop` on PYTHONPATH differs), since the script's own flags changed since;
- `serve_default`: the same with no precision flag (what a user gets: int4 for the GGUF).

Prints, per figure, old, new and new/old for each pass and the median of the passes. Run it on
an idle machine: a pass takes about 1 minute per bench. Decode figures on a shared 2-core VM
move 10-25% between passes of the same commit: take 5 passes before calling a change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCHES = {
    # name: script args both commits' scripts take (the figures' JSON is read from stdout, or
    # from the --json file when the script writes one)
    "train_throughput": ["--steps", "8", "--rounds", "1"],
    "generate": ["--skip-hf", "--batches", "1,16", "--rounds", "2"],
    "serve": "--servers lmloop --scenario chat --concurrency 1 16 --requests 32 --int8".split(),
    # the same at the server's defaults (int4 for the GGUF: commits from 801e04c on)
    "serve_default": "--servers lmloop --scenario chat --concurrency 1 16 --requests 32".split(),
}


def last_json(text: str) -> dict:
    """The last top-level JSON object a bench printed."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 :] if start >= 0 else text[text.index("{") :])


def figures(bench: str, out: dict) -> dict[str, tuple[float, bool]]:
    """name -> (value, higher is better)."""
    if bench == "train_throughput":
        return {f"{k} ms/step": (v["ms"], False) for k, v in out.items() if isinstance(v, dict)}
    if bench.startswith("serve"):
        what = "int8" if bench == "serve" else "default"
        return {f"{what} chat tok/s, {r['clients']} clients": (r["tok_per_s"], True)
                for r in out["rows"]}  # fmt: skip
    got = {}
    for m in ("fp32", "int8"):
        got[f"{m} decode tok/s, one request"] = (out[f"lmloop_{m}"]["decode_tok_s"], True)
        for a in out.get(f"aggregate_{m}", []):  # the engine's batch: a sequences at once
            got[f"{m} aggregate tok/s, batch {a['batch']}"] = (a["decode_tok_s"], True)
    return got


def run(tree: Path, bench: str, args: list[str], script_tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = tree / f"{bench}.json"
    serve = bench.startswith("serve")
    extra = ["--json", str(out)] if bench == "train_throughput" or serve else []
    script = script_tree / "bench" / f"{'serve' if serve else bench}.py"
    if serve and "--no-quality" in script.read_text():  # no Q4_0 KL step (newer)
        extra.append("--no-quality")
    p = subprocess.run([sys.executable, str(script), *args, *extra],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"{bench} at {tree.name} failed:\n{p.stderr[-2000:]}")
    if not extra:
        return last_json(p.stdout)
    got = json.loads(out.read_text())
    if serve:
        got = got["levels"] if isinstance(got, dict) else got  # today's script / fc353da's
        failed = sum(r["failed_requests"] for r in got)
        if failed or not got:
            raise SystemExit(f"serve at {tree.name}: {failed} failed requests\n{p.stdout[-2000:]}")
        return {"rows": got}
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="fc353da", help="the commit before the change")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    ap.add_argument(
        "--passes", type=int, default=2, help="passes, alternating which commit goes first"
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmloop-regress-"))
    trees = {}
    try:
        for side in ("old", "new"):
            commit = subprocess.run(["git", "rev-parse", "--short", getattr(args, side)], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
            trees[side] = tmp / f"{side}-{commit}"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(trees[side]), commit],
                           cwd=ROOT, check=True)  # fmt: skip
        results: dict = {"old": trees["old"].name, "new": trees["new"].name, "benches": {}}
        for bench in args.only:
            passes = []
            for p in range(args.passes):
                script = trees["old"] if bench.startswith("serve") else None
                order = ("old", "new") if p % 2 == 0 else ("new", "old")  # ABBA: no side
                got = {side: figures(bench, run(trees[side], bench, BENCHES[bench],  # always 2nd
                                                script or trees[side]))
                       for side in order}  # fmt: skip
                passes.append(got)
                for name, (new, _) in got["new"].items():
                    old = got["old"].get(name, (float("nan"), True))[0]
                    print(f"[{bench} pass {p + 1}] {name}: old {old:.4g}, new {new:.4g}, "
                          f"new/old {new / old:.3f}", flush=True)  # fmt: skip
            rows = {}
            for name, (_, higher) in passes[0]["new"].items():
                ratios = [q["new"][name][0] / q["old"][name][0] for q in passes
                          if name in q["old"]]  # fmt: skip
                if ratios:
                    r = statistics.median(ratios)
                    speed = r if higher else 1 / r
                    rows[name] = {"new_over_old": r, "speed_new_vs_old": speed}
            results["benches"][bench] = {"passes": passes, "summary": rows}
        print(f"\n== {trees['new'].name} against {trees['old'].name} (median of {args.passes} "
              "ABBA passes; speed > 1: the new commit is faster)")  # fmt: skip
        for bench, r in results["benches"].items():
            for name, row in r["summary"].items():
                print(f"{bench:17s} {name:32s} speed {row['speed_new_vs_old']:.3f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)  # fmt: skip


if __name__ == "__main__":
    main()
