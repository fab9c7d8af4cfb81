"""What the gate decided for each registered version, as rows a person reads.

`lmloop loop` registers a version that passed its gate with the gate's figures in the lineage
(`lineage.decision.figures`, keys in `lmloop/loop/gate.py::describe`). This module reads them back,
one row per version, oldest first, for `lmloop models show NAME --plot` (`table_lines` and
`plot_decisions`: the win rate with its interval, 0.5 a coin toss, the degenerate share before ->
after, the base perplexity change and what became of the version) and the chat page's versions
panel (`GET /v1/lmloop/versions`):

    rows = decision_rows(Registry(), "tiny")
    rows[1]["win_rate"], rows[1]["win_interval"], rows[1]["base_change"], rows[1]["decision"]
    decision_cells(rows[1])  # {"win": "0.72 [0.61, 0.83]", "degenerate": "10% -> 5%", ...}

A version registered by hand, by an older lmloop, or a seq2seq model's (judged on target
cross-entropy, not answers) lacks some figures: those are None here and "-" in the cells.
Torch-free: the server and the CLI read it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmloop.artifacts import pyplot, write_png
from lmloop.log import aligned
from lmloop.registry.store import Registry

NONE = "-"


def _number(x: Any) -> float | None:
    """A finite number, or None (JSON has no NaN; a missing figure is None)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _status(version: str, history: list[dict[str, Any]]) -> str:
    """'promoted' once made current, 'rolled back' when a rollback left it since, else
    'registered' (the gate passed but the loop ran with promote=false, or registered by hand)."""
    status = "registered"
    for h in history:
        if h.get("action") == "promote" and h.get("version") == version:
            status = "promoted"
        elif h.get("action") == "rollback" and h.get("previous") == version:
            status = "rolled back"
    return status


def decision_row(info: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """One version's row from `Registry.show` (its lineage) and the name's history."""
    decision = (info.get("lineage") or {}).get("decision") or {}
    figures = decision.get("figures") or {}
    answers = figures.get("answers") or {}
    win = answers.get("win") or {}
    degenerate = answers.get("degenerate") or {}
    interval = win.get("interval") or [None, None]
    cur_b = _number(figures.get("current_base_ppl"))
    new_b = _number(figures.get("candidate_base_ppl"))
    return {
        "version": info["version"],
        "created": info.get("created"),
        "parent": info.get("parent"),
        "current": bool(info.get("current")),
        "decision": _status(info["version"], history),
        "gated": bool(decision),  # registered by `lmloop loop` through its gate
        "reason": decision.get("reason"),
        "heldout": answers.get("n") or None,
        "win_rate": _number(win.get("win_rate")),
        "win_interval": [_number(interval[0]), _number(interval[1])] if win else None,
        "wins": win.get("wins"),
        "ties": win.get("ties"),
        "losses": win.get("losses"),
        "degenerate_current": _number((degenerate.get("current") or {}).get("share")),
        "degenerate_candidate": _number((degenerate.get("candidate") or {}).get("share")),
        "base_ppl_current": cur_b,
        "base_ppl_candidate": new_b,
        "base_change": new_b / cur_b - 1.0 if cur_b and new_b is not None else None,
    }


def decision_rows(registry: Registry, name: str) -> list[dict[str, Any]]:
    """Every version of `name`, oldest first (a UserError when the name is unknown)."""
    infos = (registry.show(name, v["version"]) for v in registry.versions(name))
    return [decision_row(info, info.get("history") or []) for info in infos]


def decision_cells(row: dict[str, Any]) -> dict[str, str]:
    """A row's figures as the text the table, the plot and the chat page show."""
    lo, hi = row["win_interval"] or [None, None]
    win = NONE
    if row["win_rate"] is not None:
        win = f"{row['win_rate']:.2f}"
        if lo is not None and hi is not None:
            win += f" [{lo:.2f}, {hi:.2f}]"
    cur_d, new_d = row["degenerate_current"], row["degenerate_candidate"]
    degenerate = NONE if cur_d is None or new_d is None else f"{cur_d:.0%} -> {new_d:.0%}"
    base = NONE if row["base_change"] is None else f"{row['base_change']:+.1%}"
    return {
        "win": win,
        "degenerate": degenerate,
        "base": base,
        "decision": row["decision"] + (" (current)" if row["current"] else ""),
    }


# ---- `lmloop models show NAME --plot`: a terminal table and a PNG -----------------------------
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
