"""RUN_DIR/curves.png: a run's training curves, drawn from its metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

from lmloop.artifacts import pyplot, write_png
from lmloop.log import read_metrics


def plot_curves(run_dir: Path) -> None:
    """RUN_DIR/curves.png: loss, perplexity (log scale) and learning rate by step, train and
    validation."""
    recs = read_metrics(run_dir / "metrics.jsonl")
    if not recs:
        return
    plt = pyplot()
    rewards = [r for r in recs if "rewards/chosen" in r or "rewards/margin" in r]
    fig, axes = plt.subplots(1, 4 if rewards else 3, figsize=(18 if rewards else 14, 3.6))
    a, p, b = axes[:3]
    steps = [r["step"] for r in recs]
    ev = [r for r in recs if "val_loss" in r]
    for ax, key, vkey, label in (
        (a, "loss", "val_loss", "loss"),
        (p, "ppl", "val_ppl", "perplexity"),
    ):
        ax.plot(steps, [r.get(key, math.nan) for r in recs], label="train")
        if ev:
            ax.plot([r["step"] for r in ev], [r.get(vkey, math.nan) for r in ev], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    p.set_yscale("log")
    b.plot(steps, [r["lr"] for r in recs])
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    b.grid(alpha=0.3)
    if rewards:  # preference runs: implicit rewards (beta * log pi/ref) and their accuracy
        c = axes[3]
        xs = [r["step"] for r in rewards]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
            c.plot(xs, [r.get(key, math.nan) for r in rewards], label=key.split("/")[1])
        if any("rewards/accuracy" in r for r in rewards):
            c2 = c.twinx()
            c2.plot(xs, [r.get("rewards/accuracy", math.nan) for r in rewards], "k:", label="acc")
            c2.set_ylabel("preference accuracy")
            c2.set_ylim(0, 1)
        c.set_xlabel("step")
        c.set_ylabel("reward")
        c.legend(loc="upper left")
        c.grid(alpha=0.3)
    fig.tight_layout()
    write_png(fig, run_dir / "curves.png", dpi=100)
