"""Training throughput: `lmloop train` vs `transformers.Trainer` on the same Llama shape.

    .venv/bin/python bench/train_throughput.py            # vocab 8192, hidden 256, 4 layers,
    .venv/bin/python bench/train_throughput.py --steps 12 # seq 256, batch 8, fp32 on CPU

Four contenders train the same architecture on the same batch shape, in one process, in
alternating rounds (the machine is shared, so each figure is the best round's median step):

- lmloop: the whole `lmloop train` loop (data from memory-mapped shards, token-normalized loss,
  clipping, AdamW, logging), reading ms/step from its metrics.jsonl;
- lmloop bare: a bare forward/backward/clip/AdamW loop over the same lmloop model;
- HF Trainer: `transformers.Trainer` training `LlamaForCausalLM` with identical shapes;
- HF bare: the same bare loop over `LlamaForCausalLM`.

It also measures this machine's fp32 matmul peak (best of square `torch.mm`) and reports each
contender's achieved GFLOP/s (training FLOPs per token x tokens/s, PaLM's 6N + attention count)
against it. Data is random tokens from a synthetic 8192-word tokenizer (throughput does not
depend on the text).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, HIDDEN, INTER, LAYERS, HEADS, SEQ, BATCH = 8192, 256, 688, 4, 4, 256, 8


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def synthetic_data_dir(root: Path, tokens: int = 400_000) -> Path:
    """A data dir in lmloop's format: a WordLevel tokenizer of exactly VOCAB ids, random tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lmloop.artifacts import make_meta, write_meta
    from lmloop.data import shards
    from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

    words = SPECIAL_TOKENS + [f"w{i}" for i in range(VOCAB - len(SPECIAL_TOKENS))]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer.from_backend(backend)
    d = root / "data"
    d.mkdir(parents=True)
    tok.save(d / "tokenizer")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", tokens), ("val", 20_000)):
        w = shards.ShardWriter(d, split, shards.dtype_for_vocab(VOCAB))
        w.write(rng.integers(len(SPECIAL_TOKENS), VOCAB, n))
        splits[split] = {"documents": 1, "bytes": 5 * n, "tokens": n, "shards": w.close()}
    info = {"sha256": tok.sha256, "vocab_size": VOCAB, "eos_id": tok.eos_id}
    write_meta(d, make_meta(shards.SCHEMA, shards.FORMAT_VERSION, None, splits=splits,
                            removed={}, tokenizer=info))  # fmt: skip
    return d


def time_lmloop(data: Path, out: Path, steps: int) -> list[float]:
    from lmloop.config import parse_args
    from lmloop.log import read_metrics
    from lmloop.stages.train import TrainConfig, run

    cfg = parse_args(TrainConfig, [
        "--data", str(data), "--out", str(out), "--max-steps", str(steps), "log_every=1",
        "eval.every=0", "eval.batches=1", "plot=false", "model.hidden_size=256",
        f"model.intermediate_size={INTER}", f"model.num_layers={LAYERS}",
        f"model.num_heads={HEADS}", f"batch.seq_len={SEQ}", f"batch.micro_batch={BATCH}",
        f"batch.global_batch={BATCH}", "schedule.warmup_steps=2",
        "precision=fp32",  # like for like: the others run fp32 (auto may pick bf16 on this CPU)
    ])  # fmt: skip
    run(cfg)
    return [r["ms"] / 1000 for r in read_metrics(out / "metrics.jsonl")]


def bare_loop(model, steps: int, hf: bool) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        if hf:
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        else:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                      tie_word_embeddings=True)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).train()


def time_trainer(steps: int, out: Path) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    class Windows(torch.utils.data.Dataset):
        def __init__(self):
            self.data = torch.randint(
                0, VOCAB, (steps * BATCH, SEQ), generator=torch.Generator().manual_seed(0)
            )

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return {"input_ids": self.data[i], "labels": self.data[i]}

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps,
        learning_rate=1e-4, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        warmup_steps=2, lr_scheduler_type="cosine", use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1000, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=hf_model(), args=args, train_dataset=Windows(), callbacks=[clock]).train()
    # on_step_begin..on_step_end excludes fetching the batch; add the dataloader's share back
    return clock.times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()

    from lmloop.models import build_model
    from lmloop.models.llama import LlamaConfig

    mcfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=HEADS, max_position_embeddings=SEQ)  # fmt: skip
    fpt = mcfg.flops_per_token(SEQ)
    tokens = BATCH * SEQ
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}", file=sys.stderr)
    peaks = []
    results: dict[str, list[float]] = {
        k: [] for k in ("lmloop", "lmloop bare", "HF Trainer", "HF bare")
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthetic_data_dir(root)
        for r in range(args.rounds):
            peaks.append(matmul_peak())

            # median of the steps after the first two (warm-up); best round wins
            def med(ts):
                return statistics.median(ts[2:] if len(ts) > 4 else ts)

            results["lmloop"].append(med(time_lmloop(data, root / f"run{r}", args.steps)))
            torch.manual_seed(0)
            results["lmloop bare"].append(
                med(bare_loop(build_model(mcfg).train(), args.steps, False))
            )
            results["HF Trainer"].append(med(time_trainer(args.steps, root / f"hf{r}")))
            torch.manual_seed(0)
            results["HF bare"].append(med(bare_loop(hf_model(), args.steps, True)))
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {tokens / v[-1]:,.0f} tok/s" for k, v in results.items()),
                file=sys.stderr,
            )
    peak = max(peaks)
    print(
        f"shape: Llama vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, seq {SEQ}, batch {BATCH}, fp32 CPU"
    )
    print(
        f"training FLOPs/token {fpt / 1e6:.1f}M; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (torch.mm 1024^2)"
    )
    print(f"{'contender':<14}{'ms/step':>10}{'tok/s':>10}{'GFLOP/s':>10}{'of peak':>9}")
    figures = {}
    for k, v in results.items():
        s = min(v)
        tps = tokens / s
        figures[k] = {"ms": s * 1000, "tok_s": tps, "gflops": fpt * tps / 1e9}
        print(
            f"{k:<14}{s * 1000:>10.0f}{tps:>10,.0f}{fpt * tps / 1e9:>10.1f}{fpt * tps / peak:>9.0%}"
        )
    ours = figures["lmloop"]["tok_s"]
    print(f"lmloop / HF Trainer = {ours / figures['HF Trainer']['tok_s']:.2f}x; "
          f"lmloop / lmloop bare = {ours / figures['lmloop bare']['tok_s']:.2f}x; "
          f"lmloop / HF bare = {ours / figures['HF bare']['tok_s']:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"peak_gflops": peak / 1e9, "flops_per_token": fpt, **figures}, indent=2)
        )


if __name__ == "__main__":
    main()
