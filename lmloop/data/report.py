"""What a prepared data folder tells a person: report.md, lengths.png and the one-line summary.

Read from the folder's meta.json (counts per split, what was removed, sources, tokenizer) for
text (`text_report`) and for input/target pairs (`pairs_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmloop.artifacts import pyplot, write_png
from lmloop.data.shards import SIDES, SPLITS


def text_report(meta: dict[str, Any], out_name: str) -> str:
    """report.md of a prepared text folder, from its meta.json."""
    lines = [f"# Data report: {out_name}", ""]
    lines += ["| split | documents | bytes | tokens | bytes/token |", "|---|---:|---:|---:|---:|"]
    for s, v in meta["splits"].items():
        bpt = f"{v['bytes'] / v['tokens']:.2f}" if v["tokens"] else "-"
        lines.append(f"| {s} | {v['documents']:,} | {v['bytes']:,} | {v['tokens']:,} | {bpt} |")
    lines += ["", "Removed (documents):", ""]
    lines += [f"- {k.replace('_', ' ')}: {v:,}" for k, v in meta["removed"].items()]
    lines += [f"- invalid UTF-8 sequences replaced: {meta['replaced']['invalid_utf8']:,}"]
    if meta["config"]["scrub_pii"]:
        found = ", ".join(f"{n} {k}" for k, n in meta["pii"].items() if n) or "none"
        lines += [f"- PII replaced: {found}"]
    lines += ["", "| source | weight | read | kept | train tokens |", "|---|---:|---:|---:|---:|"]
    for s in meta["sources"]:
        lines.append(
            f"| `{s['path']}` | {s['weight']:g} | {s['documents_read']:,} | "
            f"{s['documents_kept']:,} | {s['train_tokens']:,} |"
        )
    tok = meta["tokenizer"]
    lines += [
        "",
        f"Tokenizer: {tok['source']} (vocab {tok['vocab_size']:,}, EOS id {tok['eos_id']}, "
        f"sha256 {tok['sha256'][:12]}); shards: {meta['dtype']}.",
        "",
        "![document lengths](lengths.png)",
        "",
    ]
    return "\n".join(lines)


def plot_lengths(path: Path, panels: dict[str, dict[str, np.ndarray]], ylabel: str) -> None:
    """One bar chart per panel (e.g. document, or input and target) of log2 length bins."""
    plt = pyplot()
    width_in = 3.5 + 3.5 * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 3.5), dpi=100, squeeze=False)
    width = 0.8 / len(SPLITS)
    for ax, (name, hist) in zip(axes[0], panels.items()):
        top = max((int(np.nonzero(v)[0].max()) for v in hist.values() if v.any()), default=0)
        bins = np.arange(top + 1)
        for i, s in enumerate(SPLITS):
            ax.bar(bins + i * width, hist[s][: top + 1], width=width, label=s)
        ax.set_xticks(bins + 0.4 - width / 2, [f"{1 << b}" for b in bins], rotation=45, fontsize=7)
        ax.set_xlabel(f"{name} length in tokens (log2 bins, lower edge)")
        ax.set_yscale("symlog")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.subplots_adjust(left=0.7 / width_in, right=0.98, top=0.96, bottom=0.24, wspace=0.15)
    # no Software/date metadata, so the same data gives the same bytes
    write_png(fig, path, metadata={"Software": None})


def pairs_report(meta: dict[str, Any], out_name: str) -> str:
    """report.md of a prepared pairs folder, from its meta.json."""
    lines = [f"# Data report (input/target pairs): {out_name}", ""]
    f = meta["pairs"]
    lines += [f"Input field `{f['input_field']}`, target field `{f['target_field']}`.", ""]
    lines += [
        "| split | pairs | input tokens | target tokens | bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for s, v in meta["splits"].items():
        lines.append(
            f"| {s} | {v['pairs']:,} | {v['input_tokens']:,} | {v['target_tokens']:,} | "
            f"{v['bytes']:,} |"
        )
    lines += ["", "Removed (pairs):", ""]
    lines += [f"- {k.replace('_', ' ')}: {v:,}" for k, v in meta["removed"].items()]
    lines += [f"- invalid UTF-8 sequences replaced: {meta['replaced']['invalid_utf8']:,}"]
    lines += ["", "| source | weight | read | kept |", "|---|---:|---:|---:|"]
    for s in meta["sources"]:
        lines.append(
            f"| `{s['path']}` | {s['weight']:g} | {s['pairs_read']:,} | {s['pairs_kept']:,} |"
        )
    lines += ["", "Length histogram (pairs per log2 bin of tokens, EOS included):", ""]
    for side in SIDES:
        hist = meta["lengths_log2"][side]
        top = max((max(np.nonzero(h)[0], default=0) for h in hist.values()), default=0)
        lines += [
            f"| {side} tokens | " + " | ".join(SPLITS) + " |",
            "|---:|" + "---:|" * len(SPLITS),
        ]
        for b in range(int(top) + 1):
            row = " | ".join(f"{hist[s][b]:,}" for s in SPLITS)
            lines.append(f"| {1 << b}-{(2 << b) - 1} | {row} |")
        lines.append("")
    tok = meta["tokenizer"]
    lines += [
        f"Tokenizer: {tok['source']} (vocab {tok['vocab_size']:,}, EOS id {tok['eos_id']}); "
        f"shards: {meta['dtype']}.",
        "",
        "![lengths](lengths.png)",
        "",
    ]
    return "\n".join(lines)


def print_text_summary(meta: dict[str, Any], out: Path, *, reused: bool) -> None:
    """One line on stdout: documents and tokens per split, what was removed."""
    sp = meta["splits"]
    parts = [f"{s} {sp[s]['documents']:,} docs / {sp[s]['tokens']:,} tokens" for s in SPLITS]
    removed = ", ".join(f"{k} {v:,}" for k, v in meta["removed"].items() if v) or "nothing"
    state = "up to date" if reused else "prepared"
    print(f"{out}: {state}: {'; '.join(parts)}; removed {removed}", flush=True)


def print_pairs_summary(meta: dict[str, Any], out: Path, *, reused: bool) -> None:
    """One line on stdout: pairs and tokens per split, what was removed."""
    sp = meta["splits"]
    parts = [
        f"{s} {sp[s]['pairs']:,} pairs / {sp[s]['input_tokens']:,}+{sp[s]['target_tokens']:,} "
        "tokens"
        for s in SPLITS
    ]
    removed = ", ".join(f"{k} {v:,}" for k, v in meta["removed"].items() if v) or "nothing"
    print(f"{out}: {'up to date' if reused else 'prepared'}: {'; '.join(parts)}; removed {removed}")
