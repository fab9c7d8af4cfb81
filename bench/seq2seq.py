"""Seq2seq on an offline summary task, and its training step against `Seq2SeqTrainer`.

    .venv/bin/python bench/seq2seq.py              # full run: corpus (cached), both models, timing
    .venv/bin/python bench/seq2seq.py --quick      # smoke run: a small corpus, few steps
    .venv/bin/python bench/seq2seq.py --only quality   # or --only speed

(a) quality: the shipped teacher writes story/summary pairs offline
(`lmloop.data.synthetic.summary_pairs`: the summary names the character, object and place the
story's opening states). `lmloop data` prepares them (BPE, val/test by hash, decontaminated);
then two models of the same parameter count train with the same budget, from scratch:

- seq2seq: `configs/train/seq2seq-summaries.yaml` on the pairs (encoder reads the story, loss on
  the summary's tokens);
- decoder-only: the Llama family at the same width, with as many layers as bring its parameter
  count nearest, trained with `task: sft` on `{"prompt": story, "completion": summary}` records
  made from the same train pairs (decoded from the shards): the tokenizer's chat template is the
  separator, and only the summary's tokens (and the end-of-turn marker) carry loss.

Same steps, pairs per step, optimizer, learning rate and schedule, and no truncation on either side
(the decoder's context holds the longest story + summary). Tokens per step are printed for each:
the decoder-only model also reads the template's few tokens. Then, on the test pairs: greedy
outputs scored by the eval stage's own scorer (sacrebleu chrF, rouge-score ROUGE-L), exact-match
rate, and target-token perplexity (each model's cross-entropy on the summary tokens plus one end
marker: EOS for seq2seq, the end-of-turn token for the decoder; same summary text, same BPE).

(b) speed: the training step (forward, backward, clipping, AdamW) on a T5-small-like shape at
fixed input/target lengths, random tokens, fp32 on CPU, in alternating rounds (the machine is
shared, so each figure is the best round's median step; warm-up steps excluded):

- lmloop: the whole `lmloop train` loop on a paired data dir (ms/step from its metrics.jsonl);
- lmloop bare: a bare forward/backward/clip/AdamW loop over the same lmloop model;
- HF Seq2SeqTrainer: `transformers.Seq2SeqTrainer` training `T5ForConditionalGeneration` with the
  same config and its default optimizer, torch's fused AdamW (`optim="adamw_torch_fused"`, the
  kernel `lmloop train` uses too; no eval, no saving, dataloader workers 0);
- HF bare: the bare loop over `T5ForConditionalGeneration` (both bare loops: fused AdamW).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "train" / "seq2seq-summaries.yaml"

# (b)'s shape: t5-small's layout, narrower (d_model 256, d_ff 1024, 4 + 4 layers, 4 heads of 64),
# T5 1.1's gated-gelu, tied head; inputs of 64 tokens, targets of 16, 8 pairs a step.
VOCAB, D_MODEL, D_FF, LAYERS, HEADS, SRC, TGT, BATCH = 8192, 256, 1024, 4, 4, 64, 16, 8


# ---- (a) quality ------------------------------------------------------------------------------


def prepare(pairs: Path, out: Path, vocab: int) -> Path:
    from lmloop.data.sources import SourceSpec
    from lmloop.stages import data as data_stage

    data_stage.run(data_stage.DataConfig(
        source=[SourceSpec(path=str(pairs))], out=str(out), vocab_size=vocab,
        input_field="story", target_field="summary", val_fraction=0.05, test_fraction=0.1,
    ))  # fmt: skip
    return out


def train_config(args, data: Path, out: Path, **over):
    from lmloop.config import parse_args
    from lmloop.stages.train import TrainConfig

    argv = [str(CONFIG), "--data", str(data), "--out", str(out), "plot=false",
            f"max_steps={args.steps}", f"log_every={max(1, args.steps // 10)}",
            "precision=fp32"]  # like for like with the fp32 peer (auto may pick bf16 here)  # fmt: skip
    argv += [f"{k}={v}" for k, v in over.items()]
    return parse_args(TrainConfig, argv)


def matched_layers(s2s_cfg, vocab: int, seq: int, tok) -> tuple[int, int, int]:
    """(decoder layers, their parameter count, the seq2seq model's) nearest in parameters."""
    import dataclasses

    from lmloop.models import FAMILIES

    m = s2s_cfg.model
    target = FAMILIES["seq2seq"][0].from_spec(m, vocab, seq, tok.bos_id, tok.eos_id).num_params()
    best = None
    for n in range(1, 4 * m.num_layers + 1):
        spec = dataclasses.replace(m, family="llama", num_layers=n, positions="sinusoidal")
        p = FAMILIES["llama"][0].from_spec(spec, vocab, seq, tok.bos_id, tok.eos_id).num_params()
        if best is None or abs(p - target) < abs(best[1] - target):
            best = (n, p)
    return best[0], best[1], target


def side_text(tok, ids: list[int]) -> str:
    """A side's text, without its EOS (as `lmloop eval` decodes its references)."""
    return tok.decode(ids[:-1], skip_special_tokens=True).strip()


def _rows(pairs) -> list[tuple[list[int], list[int]]]:
    """A split's (input ids, target ids) pairs, each side ending in EOS."""
    return [tuple([int(t) for t in side] for side in pairs[i]) for i in range(len(pairs))]


@torch.inference_mode()
def decoder_eval(model, tok, records: list[dict[str, str]], max_new: int) -> dict:
    """Greedy outputs through lmloop's engine and target-token perplexity of a decoder-only model."""
    import torch.nn.functional as F

    from lmloop.engine import Engine, SamplingParams
    from lmloop.training import batches as td

    model.eval()
    rows = td.tokenize_records(
        [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
         for r in records], tok, 10**6)  # fmt: skip
    nll, n = 0.0, 0
    for i in range(0, len(rows), 16):
        x, y = td.pad_rows(rows[i : i + 16], td.pad_id_of(tok))
        logits = model(x)
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                     reduction="sum"))  # fmt: skip
        n += int((y != -100).sum())
    engine = Engine(model, tok, max_batch=16, max_waiting=len(records) + 16)
    engine.start()
    try:
        handles = [
            engine.submit(
                tok.encode(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}])),
                SamplingParams(max_tokens=max_new, temperature=0.0),
            )
            for r in records
        ]
        hyps = ["".join(o.text for o in h).strip() for h in handles]
    finally:
        engine.stop()
    return {"hyps": hyps, "ppl": float(np.exp(nll / n)), "target_tokens": n}


def quality(args, root: Path) -> dict:
    from lmloop.data import shards
    from lmloop.data.synthetic import summary_pairs
    from lmloop.evaluation.seq2seq import evaluate_pairs, generation_metrics
    from lmloop.log import read_metrics
    from lmloop.models.io import load_model
    from lmloop.models.seq2seq import generate as greedy
    from lmloop.stages import train
    from lmloop.tokenizer import Tokenizer

    report: dict = {}
    t0 = time.perf_counter()
    pairs = summary_pairs(args.stories, max_tokens=args.story_tokens, threads=args.threads,
                          report=report)  # fmt: skip
    t_corpus = time.perf_counter() - t0
    how = "cached" if report.get("cached") else (
        f"{report['tokens']:,} teacher tokens in {report['seconds']:.0f} s, "
        f"{report['tokens_per_s']:.0f} tok/s")  # fmt: skip
    print(f"corpus: {pairs} ({how}; {t_corpus:.0f} s)", file=sys.stderr)
    data = prepare(pairs, root / "data", args.vocab)
    tok = Tokenizer.load(data)
    split = {s: _rows(shards.open_pairs(data, s)) for s in ("train", "val", "test")}
    n_test = min(len(split["test"]), args.test_pairs)
    test = split["test"][:n_test]
    every = [r for rows in split.values() for r in rows]
    longest = max(len(a) + len(b) for a, b in every)

    s2s_cfg = train_config(args, data, root / "s2s")
    seq = max(max(len(a), len(b)) for a, b in every)
    if seq > s2s_cfg.batch.seq_len:
        print(f"note: the longest side is {seq} tokens, the config's seq_len "
              f"{s2s_cfg.batch.seq_len}: cut", file=sys.stderr)  # fmt: skip
    layers, _, _ = matched_layers(s2s_cfg, tok.vocab_size, seq, tok)

    # the decoder-only model's records: the same train pairs, as text
    recs = root / "sft.jsonl"
    train_rows = [{"prompt": side_text(tok, a), "completion": side_text(tok, b)}
                  for a, b in split["train"]]  # fmt: skip
    recs.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    dec_seq = longest + 16  # the chat template's tokens: never cut
    dec_cfg = train_config(args, recs, root / "dec", task="sft", tokenizer=str(data),
                           **{"model.family": "llama", "model.num_layers": layers,
                              "model.positions": "sinusoidal", "batch.seq_len": dec_seq,
                              "model.max_seq_len": dec_seq + args.max_new,
                              "eval.val_fraction": 0})  # fmt: skip

    results = {}
    for name, cfg in (("seq2seq", s2s_cfg), ("decoder-only", dec_cfg)):
        t0 = time.perf_counter()
        res = train.run(cfg)
        secs = time.perf_counter() - t0
        loaded = load_model(str(Path(cfg.out) / "checkpoints" / res.latest))  # the last step
        ms = [r["ms"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if "ms" in r]
        results[name] = {"train_s": secs, "train_loss": res.train_loss,
                         "ms_step": statistics.median(ms[1:] if len(ms) > 2 else ms),
                         "params": sum(p.numel() for p in loaded.model.parameters()),
                         "model": loaded.model}  # fmt: skip
    refs = [side_text(tok, b) for _, b in test]

    # seq2seq: target perplexity by the eval stage (its generation skipped), greedy outputs by
    # the model's own decode (equal to the engine's, which `lmloop eval` scores), both through
    # the same scorer below
    model = results["seq2seq"]["model"]
    ev = evaluate_pairs(model, tok, test, max_new_tokens=0, show_progress=False)
    stops = {int(t) for t in tok.stop_ids} | {int(model.config.eos_token_id)}
    gen = greedy(model, [a for a, _ in test], max_new_tokens=args.max_new,
                 stop_ids=stops, pad_id=int(model.config.pad_token_id), show_progress=False)  # fmt: skip
    hyps = {"seq2seq": [tok.decode(g, skip_special_tokens=True).strip() for g in gen]}
    m = generation_metrics(hyps["seq2seq"], refs)
    results["seq2seq"].update(ppl=ev["token_perplexity"], chrf=m["chrf"], rougeL=m["rougeL"],
                              target_tokens=ev["counts"]["tokens"])  # fmt: skip
    dv = decoder_eval(results["decoder-only"]["model"], tok,
                      [{"prompt": side_text(tok, a), "completion": r} for (a, _), r in zip(test, refs)],
                      args.max_new)  # fmt: skip
    hyps["decoder-only"] = dv["hyps"]
    m = generation_metrics(dv["hyps"], refs)
    results["decoder-only"].update(ppl=dv["ppl"], chrf=m["chrf"], rougeL=m["rougeL"],
                                   target_tokens=dv["target_tokens"])  # fmt: skip
    for name in results:
        results[name]["exact"] = sum(h == r for h, r in zip(hyps[name], refs)) / len(refs)
        results[name].pop("model")

    # tokens read per step, on average: both sides of a pair; the decoder's whole sequence
    per_row = {"seq2seq": [len(a) + len(b) for a, b in split["train"]],
               "decoder-only": [len(x) + 1 for x, _ in _sft_rows(train_rows, tok)]}  # fmt: skip
    for name, n in per_row.items():
        results[name]["tokens_per_step"] = s2s_cfg.batch.global_batch * sum(n) / len(n)

    print(f"\n(a) story -> summary, {len(split['train'])} train pairs, {n_test} test pairs, "
          f"BPE {tok.vocab_size}; {args.steps} steps x {s2s_cfg.batch.global_batch} pairs, "
          f"{s2s_cfg.optim.name} lr {s2s_cfg.optim.lr:g}, {s2s_cfg.schedule.kind} schedule")  # fmt: skip
    print(
        f"seq2seq: {s2s_cfg.model.num_layers}+{s2s_cfg.model.num_layers} layers; "
        f"decoder-only (llama): {layers} layers; width {s2s_cfg.model.hidden_size}"
    )
    print(f"{'model':<14}{'params':>11}{'tok/step':>10}{'ms/step':>9}{'train s':>9}{'loss':>7}"
          f"{'tgt ppl':>9}{'chrF':>7}{'ROUGE-L':>9}{'exact':>7}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:<14}{r['params']:>11,}{r['tokens_per_step']:>10,.0f}{r['ms_step']:>9.0f}"
              f"{r['train_s']:>9.0f}"
              f"{r['train_loss']:>7.3f}{r['ppl']:>9.3f}{r['chrf']:>7.1f}{100 * r['rougeL']:>9.1f}"
              f"{r['exact']:>7.0%}")  # fmt: skip
    for i in range(min(3, n_test)):
        print(
            f"  reference: {refs[i]}\n  seq2seq:   {hyps['seq2seq'][i]}\n"
            f"  decoder:   {hyps['decoder-only'][i]}"
        )
    return {"train_pairs": len(split["train"]), "test_pairs": n_test, "steps": args.steps,
            "corpus_s": t_corpus, **results}  # fmt: skip


def _sft_rows(records, tok):
    from lmloop.training import batches as td

    return td.tokenize_records(
        [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
         for r in records], tok, 10**6)  # fmt: skip


# ---- (b) speed ---------------------------------------------------------------------------------


def synthetic_pairs_dir(root: Path, n: int) -> Path:
    """A paired data dir in lmloop's format: a WordLevel tokenizer of exactly VOCAB ids, random
    inputs of SRC tokens and targets of TGT tokens (EOS included)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lmloop.artifacts import make_meta, write_meta
    from lmloop.data import shards
    from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

    words = SPECIAL_TOKENS + [f"w{i}" for i in range(VOCAB - len(SPECIAL_TOKENS))]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer.from_backend(backend)
    d = root / "pairs"
    d.mkdir(parents=True)
    tok.save(d / "tokenizer")
    eos = tok.separator_id
    rng = np.random.default_rng(0)
    dtype = shards.dtype_for_vocab(VOCAB)
    splits = {}
    for split, count in (("train", n), ("val", 8), ("test", 0)):
        files = {}
        for side, length in (("input", SRC), ("target", TGT)):
            w = shards.ShardWriter(d, f"{split}-{side}", dtype)
            ids = rng.integers(len(SPECIAL_TOKENS), VOCAB, (count, length))
            ids[:, -1] = eos
            if count:
                w.write(ids.reshape(-1).astype(dtype))
            files[side] = w.close()
        splits[split] = {"pairs": count, "shards": files}
    info = {"sha256": tok.sha256, "vocab_size": VOCAB, "eos_id": eos}
    write_meta(d, make_meta(shards.PAIRS_SCHEMA, shards.PAIRS_FORMAT_VERSION, None,
                            splits=splits, removed={}, tokenizer=info))  # fmt: skip
    return d


def time_lmloop(data: Path, out: Path, steps: int) -> list[float]:
    from lmloop.config import parse_args
    from lmloop.log import read_metrics
    from lmloop.stages.train import TrainConfig, run

    cfg = parse_args(TrainConfig, [
        "--data", str(data), "--out", str(out), "--max-steps", str(steps), "log_every=1",
        "eval.every=0", "eval.batches=1", "plot=false", "model.family=seq2seq",
        "model.positions=relative", f"model.hidden_size={D_MODEL}",
        f"model.intermediate_size={D_FF}", f"model.num_layers={LAYERS}",
        f"model.num_heads={HEADS}", f"batch.seq_len={SRC}", f"batch.micro_batch={BATCH}",
        f"batch.global_batch={BATCH}", "schedule.warmup_steps=2",
    ])  # fmt: skip
    run(cfg)
    return [r["ms"] / 1000 for r in read_metrics(out / "metrics.jsonl")]


def random_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(4, VOCAB, (BATCH, SRC), generator=g), torch.randint(
        4, VOCAB, (BATCH, TGT), generator=g
    )


def bare_loop(model, steps: int, hf: bool) -> list[float]:
    import torch.nn.functional as F

    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(BATCH, SRC, dtype=torch.bool)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, y = random_batch(g)
        if hf:
            loss = model(input_ids=x, attention_mask=mask.long(), labels=y).loss
        else:
            logits = model(x, None, mask, y)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def lmloop_model():
    from lmloop.models import build_model
    from lmloop.models.seq2seq import Seq2SeqConfig

    cfg = Seq2SeqConfig(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=D_FF,
                        num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=SRC,
                        feed_forward_proj="gated-gelu", pad_token_id=0,
                        decoder_start_token_id=0, eos_token_id=1)  # fmt: skip
    return build_model(cfg).train()


def hf_model():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=D_FF,
                   num_layers=LAYERS, num_heads=HEADS, feed_forward_proj="gated-gelu",
                   dropout_rate=0.0, tie_word_embeddings=True, pad_token_id=0,
                   decoder_start_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(cfg).train()


def time_trainer(steps: int, out: Path, optim: str) -> list[float]:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    class Pairs(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randint(4, VOCAB, (steps * BATCH, SRC), generator=g)
            self.y = torch.randint(4, VOCAB, (steps * BATCH, TGT), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "attention_mask": torch.ones(SRC, dtype=torch.long),
                    "labels": self.y[i]}  # fmt: skip

    clock = Clock()
    args = Seq2SeqTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps,
        learning_rate=1e-4, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        warmup_steps=2, lr_scheduler_type="cosine", use_cpu=True, report_to=[],
        save_strategy="no", eval_strategy="no", logging_steps=1000, dataloader_num_workers=0,
        disable_tqdm=True, optim=optim,
    )  # fmt: skip
    Seq2SeqTrainer(model=hf_model(), args=args, train_dataset=Pairs(), callbacks=[clock]).train()
    return clock.times


def speed(args, root: Path) -> dict:
    data = synthetic_pairs_dir(root, args.speed_steps * BATCH)
    results: dict[str, list[float]] = {
        k: [] for k in ("lmloop", "lmloop bare", "HF Seq2SeqTrainer", "HF bare")
    }

    def med(ts):  # the steps after the first two (warm-up)
        return statistics.median(ts[2:] if len(ts) > 4 else ts)

    for r in range(args.rounds):
        results["lmloop"].append(med(time_lmloop(data, root / f"run{r}", args.speed_steps)))
        torch.manual_seed(0)
        results["lmloop bare"].append(med(bare_loop(lmloop_model(), args.speed_steps, False)))
        results["HF Seq2SeqTrainer"].append(
            med(time_trainer(args.speed_steps, root / f"hf{r}", "adamw_torch_fused"))
        )
        torch.manual_seed(0)
        results["HF bare"].append(med(bare_loop(hf_model(), args.speed_steps, True)))
        print(f"round {r + 1}: " + ", ".join(f"{k} {1000 * v[-1]:.0f} ms" for k, v in results.items()),
              file=sys.stderr)  # fmt: skip
    n_ours = sum(p.numel() for p in lmloop_model().parameters())
    n_hf = sum(p.numel() for p in hf_model().parameters())
    print(f"\n(b) training step, T5 shape: vocab {VOCAB}, d_model {D_MODEL}, d_ff {D_FF} gated-gelu, "
          f"{LAYERS}+{LAYERS} layers, {HEADS} heads; input {SRC}, target {TGT}, batch {BATCH}; "
          f"fp32 CPU, {torch.get_num_threads()} threads; params lmloop {n_ours:,}, HF {n_hf:,}")  # fmt: skip
    print(f"{'contender':<30}{'ms/step':>9}")
    figures = {k: 1000 * min(v) for k, v in results.items()}
    for k, ms in figures.items():
        print(f"{k:<30}{ms:>9.0f}")
    print(f"lmloop vs HF Seq2SeqTrainer (both fused AdamW): "
          f"{figures['HF Seq2SeqTrainer'] / figures['lmloop']:.2f}x as fast; bare loops: "
          f"{figures['HF bare'] / figures['lmloop bare']:.2f}x")  # fmt: skip
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small corpus, few steps")
    ap.add_argument("--only", choices=("quality", "speed"), default=None)
    ap.add_argument("--stories", type=int, default=1200, help="pairs the teacher writes")
    ap.add_argument("--story-tokens", type=int, default=64, help="teacher tokens per story")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each model")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the pairs")
    ap.add_argument("--test-pairs", type=int, default=200, help="held-out pairs scored")
    ap.add_argument("--max-new", type=int, default=32, help="most tokens per greedy summary")
    ap.add_argument("--speed-steps", type=int, default=12, help="timed steps per contender")
    ap.add_argument("--rounds", type=int, default=2, help="alternating speed rounds")
    ap.add_argument("--threads", type=int, default=2, help="the teacher engine's threads")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.stories, args.story_tokens = min(args.stories, 160), min(args.story_tokens, 32)
        args.steps = args.steps or 30
        args.speed_steps, args.rounds = min(args.speed_steps, 6), 1
    args.steps = args.steps or _config_steps()
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}", file=sys.stderr)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "quality"):
            out["quality"] = quality(args, root / "a")
        if args.only in (None, "speed"):
            out["speed"] = speed(args, root / "b")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


def _config_steps() -> int:
    import yaml

    return int(yaml.safe_load(CONFIG.read_text())["max_steps"])


if __name__ == "__main__":
    main()
