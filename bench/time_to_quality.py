"""Time to quality: lmloop's default small recipe vs a nanoGPT-style baseline, same model and data.

    .venv/bin/python bench/time_to_quality.py                       # WikiText-2 from ../shared
    .venv/bin/python bench/time_to_quality.py --steps 200 --set model.hidden_size=128

Both recipes train the model of `configs/train/wikitext-small.yaml` (with any `--set` overrides)
for the same number of steps and tokens on the same data, one after the other in this process:

- baseline "nanogpt": AdamW (betas 0.9/0.95, weight decay 0.1), linear warmup (5% of the run)
  then cosine to 10% of the peak LR, as nanoGPT's train.py (`--baseline-lr` sets its LR);
- "lmloop": the config as shipped (Muon for hidden matrices + AdamW, warmup-stable-decay).

The figure is the training wall time (evaluation and checkpointing left out, as metrics.jsonl's
`elapsed_s` counts it) our recipe needs to reach the validation loss the baseline ends at, over
the baseline's whole time; target <= 0.8. Steps to that loss are printed too, since they do not
depend on how loaded the machine is. Finally both models' bits per byte on WikiText-2 test
(`wiki.test.raw`, joined, disjoint windows of the training length) through lmloop.evaluation.perplexity.

Offline, the data is WikiText-2 *valid* (train; 10% held out as val) and the test file is kept
out of training by the data stage's decontamination.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
CONFIG = ROOT / "configs" / "train" / "wikitext-small.yaml"


def prepare(out: Path) -> Path:
    if (out / "meta.json").is_file():
        return out
    cmd = [sys.executable, "-m", "lmloop.cli", "data", "--source", str(SHARED / "wiki.valid.raw"),
           "--out", str(out), "--vocab-size", "8192", "--val-fraction", "0.1",
           "--test-fraction", "0", "--decontaminate-with", str(SHARED / "wiki.test.raw")]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def train(data: Path, out: Path, steps: int, overrides: list[str]) -> list[dict]:
    from lmloop.config import parse_args
    from lmloop.log import read_metrics
    from lmloop.stages.train import TrainConfig, run

    argv = [str(CONFIG), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "plot=false", *overrides]  # fmt: skip
    print("lmloop train " + " ".join(argv[1:]), file=sys.stderr)
    run(parse_args(TrainConfig, argv))
    return read_metrics(out / "metrics.jsonl")


def test_bpb(run_dir: Path, window: int, max_chars: int) -> float:
    from lmloop.evaluation.perplexity import evaluate_texts
    from lmloop.models.io import load_model

    text = (SHARED / "wiki.test.raw").read_text(encoding="utf-8")
    if max_chars:
        text = text[:max_chars]
    lm = load_model(run_dir)
    return evaluate_texts(lm, [text], window=window, show_progress=False)["bits_per_byte"]


def smollm2_lora(root: Path, steps: int, test_chars: int, window: int, overrides: list) -> dict:
    """SmolLM2-135M-Instruct LoRA-tuned on WikiText-2 valid: test perplexity before and after."""
    from lmloop.evaluation.perplexity import evaluate_texts
    from lmloop.models.io import load_model

    data = root / "wt2-smol"
    cmd = [sys.executable, "-m", "lmloop.cli", "data", "--source", str(SHARED / "wiki.valid.raw"),
           "--out", str(data), "--tokenizer", "smollm2-135m-instruct", "--val-fraction", "0.05",
           "--test-fraction", "0", "--decontaminate-with", str(SHARED / "wiki.test.raw")]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    text = (SHARED / "wiki.test.raw").read_text(encoding="utf-8")[:test_chars]

    def score(spec: str) -> dict:
        f = evaluate_texts(load_model(spec), [text], window=window, show_progress=False)
        return {k: f[k] for k in ("token_perplexity", "bits_per_byte")} | {
            "tokens": f.get("tokens")
        }

    before = score("smollm2-135m-instruct")
    print(f"SmolLM2 before: {before}", file=sys.stderr)
    from lmloop.config import parse_args
    from lmloop.log import read_metrics
    from lmloop.stages.train import TrainConfig, run

    out = root / "smol-lora"
    cfg = parse_args(TrainConfig, [
        str(ROOT / "configs" / "train" / "smollm2-finetune.yaml"), "--data", str(data),
        "--out", str(out), "--max-steps", str(steps), "eval.every=0", "eval.batches=2",
        "log_every=1", "plot=false", "schedule.warmup_steps=2", *overrides,
    ])  # fmt: skip
    run(cfg)
    recs = read_metrics(out / "metrics.jsonl")
    after = score(str(out))
    return {"before": before, "after": after, "steps": steps,
            "step_s": recs[-1]["elapsed_s"] / len(recs), "test_chars": test_chars,
            "tokens_per_step": cfg.batch.global_batch * cfg.batch.seq_len,
            "window": window}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="a prepared data dir (default: build WikiText-2)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--baseline", default="nanogpt", choices=["nanogpt"])
    ap.add_argument("--baseline-lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--test-chars", type=int, default=0, help="score only this much of test")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for both recipes")
    ap.add_argument("--json", default="")
    ap.add_argument("--smollm2-steps", type=int, default=0, help="only the SmolLM2 LoRA part")
    ap.add_argument("--smollm2-test-chars", type=int, default=40_000)
    args = ap.parse_args()

    if args.smollm2_steps:
        with tempfile.TemporaryDirectory() as tmp:
            fig = smollm2_lora(
                Path(tmp), args.smollm2_steps, args.smollm2_test_chars, 512, args.set
            )
        b, a = fig["before"], fig["after"]
        print(
            f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), LoRA r=8 q/k/v/o, {fig['steps']} steps "
            f"of {fig['tokens_per_step']} tokens on WikiText-2 valid ({fig['step_s']:.1f} s/step)"
        )
        print(
            f"WikiText-2 test, first {fig['test_chars']:,} chars, disjoint windows of {fig['window']}: "
            f"token ppl {b['token_perplexity']:.2f} -> {a['token_perplexity']:.2f}, "
            f"bits/byte {b['bits_per_byte']:.4f} -> {a['bits_per_byte']:.4f}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = Path(args.data) if args.data else prepare(root / "wt2")
        common = [f"eval.every={args.eval_every}", "save_every=0", *args.set]
        warm = max(1, args.steps // 20)
        baseline = [
            "optim.name=adamw", f"optim.lr={args.baseline_lr}", "optim.weight_decay=0.1",
            "optim.beta1=0.9", "optim.beta2=0.95", "schedule.kind=cosine",
            f"schedule.warmup_steps={warm}", "schedule.min_lr_ratio=0.1",
        ]  # fmt: skip
        runs = {
            args.baseline: train(data, root / "base", args.steps, common + baseline),
            "lmloop": train(data, root / "ours", args.steps, common),
        }
        seq = json.loads((root / "ours" / "config.json").read_text())["batch"]["seq_len"]
        bpb = {
            name: test_bpb(root / ("base" if name != "lmloop" else "ours"), seq, args.test_chars)
            for name in runs
        }

    base, ours = runs[args.baseline], runs["lmloop"]
    base_evals = [r for r in base if "val_loss" in r]
    ours_evals = [r for r in ours if "val_loss" in r]
    target = base_evals[-1]["val_loss"]
    base_time = base[-1]["elapsed_s"]
    hit = next((r for r in ours_evals if r["val_loss"] <= target), None)
    print(f"steps {args.steps}, same model, data and tokens per step for both recipes")
    for name, recs in runs.items():
        ev = [r for r in recs if "val_loss" in r]
        print(
            f"{name:<8} final val loss {ev[-1]['val_loss']:.4f}  train time {recs[-1]['elapsed_s']:.0f} s"
            f"  ({recs[-1]['elapsed_s'] / args.steps * 1000:.0f} ms/step)"
            f"  test bpb {bpb[name]:.4f}"
        )
    figures = {"target_val_loss": target, "baseline_time_s": base_time, "test_bpb": bpb}
    if hit:
        ratio = hit["elapsed_s"] / base_time
        print(
            f"lmloop reaches the baseline's final val loss {target:.4f} at step {hit['step']} "
            f"after {hit['elapsed_s']:.0f} s: {ratio:.2f}x the baseline's time "
            f"({hit['step'] / args.steps:.2f}x its steps)"
        )
        figures.update(hit_step=hit["step"], hit_time_s=hit["elapsed_s"], ratio=ratio)
    else:
        print(f"lmloop did not reach the baseline's final val loss {target:.4f}")
    figures["curves"] = {
        n: [(r["step"], r["elapsed_s"], r["val_loss"]) for r in recs if "val_loss" in r]
        for n, recs in runs.items()
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
