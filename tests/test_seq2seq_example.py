"""The offline seq2seq example's config (`configs/train/seq2seq-summaries.yaml`): it parses into
the train config the docs and `bench/seq2seq.py` describe, and trains on story/summary pairs made
by `lmloop.data.synthetic.pair_rows` (hand-written stories here; the teacher's in the bench)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmloop.cli import main
from lmloop.config import parse_args
from lmloop.data.synthetic import pair_rows, story_parts, summary_openings
from lmloop.log import read_metrics
from lmloop.models import FAMILIES
from lmloop.stages.train import TrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "seq2seq-summaries.yaml"


def test_config_is_a_small_seq2seq_from_scratch():
    cfg = parse_args(TrainConfig, [str(CONFIG), "--data", "d", "--out", "o"])
    assert (cfg.model.family, cfg.model.positions) == ("seq2seq", "relative")
    assert cfg.init_from is None and cfg.optim.name == "adamw" and cfg.max_steps == 200
    # the vocabulary, BOS and EOS of the bench's pairs (`lmloop data`'s BPE)
    m = FAMILIES["seq2seq"][0].from_spec(cfg.model, 2048, cfg.batch.seq_len, 2, 0)
    assert (m.d_model, m.num_layers, m.num_decoder_layers or m.num_layers) == (192, 3, 3)
    assert (m.num_heads, m.d_kv, m.d_ff) == (4, 48, 512)
    assert m.decoder_start_token_id == 2 and m.eos_token_id == 0
    assert 3_000_000 < m.num_params() < 4_000_000  # "small": 3.5M at the bench's vocabulary


def test_config_trains_on_summary_pairs(tmp_path):
    parts = story_parts(48, seed=1)
    openings = summary_openings(parts, seed=1)
    stories = [f"{o} The sun was warm and {p['theme']} made the day better." for p, o in
               zip(parts, openings)]  # fmt: skip
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(parts, openings, stories)))
    data = tmp_path / "data"
    assert main(["data", "--source", str(src), "--out", str(data), "--input-field", "story",
                 "--target-field", "summary", "--vocab-size", "400", "--near-dedup", "false",
                 "--decontaminate", "false"]) == 0  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), "--data", str(data), "--out", str(run), "max_steps=5",
                 "log_every=1", "eval.batches=1", "schedule.warmup_steps=2", "plot=false",
                 "batch.micro_batch=8", "batch.global_batch=8"]) == 0  # fmt: skip
    rows = read_metrics(run / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0  # it learns: the summaries' words are few and repeated
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"]["model"]["family"] == "seq2seq"
