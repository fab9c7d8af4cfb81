"""The gate's decisions across a model's versions: a terminal table and a PNG.

    lmloop models show tiny --plot decisions.png

For each registered version, oldest first: the judge's win rate of the candidate over the
version it was trained from, with its interval (error bars; 0.5 is a coin toss), the share of
degenerate answers before -> after, the base-validation perplexity change, and what became of it
(promoted, registered, rolled back; the current one marked). The rows come from
`lmloop.registry.decisions`, which the chat page's versions panel reads too. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmloop.artifacts import pyplot, write_png
from lmloop.log import aligned
from lmloop.registry.decisions import decision_cells

HEADER = ["", "version", "decision", "win rate [interval]", "degenerate", "base ppl", "parent"]


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per version (after a header), columns aligned; '*' marks the current one."""
    table = [HEADER]
    for r in rows:
        c = decision_cells(r)
        table.append(["*" if r["current"] else "", r["version"], r["decision"], c["win"],
                      c["degenerate"], c["base"], r["parent"] or "-"])  # fmt: skip
    return aligned(table)


def plot_decisions(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """`out` (PNG, written atomically): each version's win rate with its interval, labelled
    with its degenerate share, base perplexity change and decision."""
    plt = pyplot()
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.7 * len(rows) + 2), 4.4))
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=1, label="coin toss (0.5)")
    have = [(x, r) for x, r in zip(xs, rows, strict=True) if r["win_rate"] is not None]
    for x, r in have:
        lo, hi = r["win_interval"] or [None, None]
        err = None
        if lo is not None and hi is not None:
            err = [[max(0.0, r["win_rate"] - lo)], [max(0.0, hi - r["win_rate"])]]
        colour = "tab:green" if r["decision"] == "promoted" else "tab:orange"
        ax.errorbar([x], [r["win_rate"]], yerr=err, fmt="o", capsize=6, color=colour)
        ax.annotate(decision_cells(r)["win"], (x, r["win_rate"]), textcoords="offset points",
                    xytext=(8, 0), fontsize=8, va="center")  # fmt: skip
    for x, r in zip(xs, rows, strict=True):
        if r["win_rate"] is None:
            ax.annotate("no gate figures", (x, 0.5), ha="center", va="bottom", fontsize=8,
                        color="0.5", xytext=(0, 6), textcoords="offset points")  # fmt: skip
    labels = []
    for r in rows:
        c = decision_cells(r)
        labels.append(f"{r['version']}\n{c['decision']}\ndegenerate {c['degenerate']}\n"
                      f"base ppl {c['base']}")  # fmt: skip
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judge win rate vs. the version before")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    write_png(fig, out, dpi=100)
