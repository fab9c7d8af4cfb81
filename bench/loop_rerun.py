"""One loop cycle on a recorded feedback store, with config overrides, scored by the answer key.

    .venv/bin/python bench/loop_rerun.py --family three-points --db W/three-points.db \
        --base W/base --out /tmp/rerun [key=value ...]

For comparing configurations on the same feedback (BENCHMARKS.md, the loop's ablation table): a
store `bench/loop.py --work W` recorded is reused, SmolLM2-135M-Instruct is registered fresh as v1
in a private registry under --out, and one `lmloop loop` cycle runs with `LoopConfig()` plus the
overrides. Afterwards (never inside the gate) the family's rule scores the gate's own held-out
answers (eval/answers.json) for v1 and the candidate. Set LMLOOP_CACHE to reuse base perplexities.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--base", required=True, help="the prepared base data dir")
    ap.add_argument("--out", required=True, help="a fresh dir (removed first)")
    ap.add_argument("overrides", nargs="*", help="LoopConfig key=value")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ["LMLOOP_HOME"] = str(root / "home")

    from lmloop.config import parse_args
    from lmloop.errors import UserError
    from lmloop.loop.config import LoopConfig
    from lmloop.loop.users import FAMILIES
    from lmloop.registry import Registry
    from lmloop.registry.spec import locate
    from lmloop.stages import loop as loop_stage

    reg, name = Registry(), f"assistant-{args.family}"
    reg.promote(name, reg.register(name, locate("smollm2-135m-instruct").path, lineage={}))
    cfg = parse_args(LoopConfig, [f"name={name}", f"db={args.db}", f"base_data={args.base}",
                                  f"work_dir={root / 'loop'}", *args.overrides])  # fmt: skip
    t = time.monotonic()
    try:
        res = loop_stage.run(cfg)
    except UserError as e:
        print(f"refused before training ({(time.monotonic() - t) / 60:.1f} min): {e}")
        return
    answers = json.loads((res.cycle_dir / "eval" / "answers.json").read_text())
    rule = FAMILIES[args.family].complies
    cur = sum(rule(a["current"]["text"]) for a in answers) / len(answers)
    cand = sum(rule(a["candidate"]["text"]) for a in answers) / len(answers)
    print(
        f"{args.family}: {(time.monotonic() - t) / 60:.1f} min; by the key on the gate's "
        f"{len(answers)} held-out prompts {cur:.0%} -> {cand:.0%}; promoted={res.promoted}: "
        f"{res.reason}"
    )


if __name__ == "__main__":
    main()
