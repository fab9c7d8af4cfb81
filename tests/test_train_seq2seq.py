"""`lmloop train` on input/target pairs: the seq2seq family from scratch and from a T5 folder,
loss on target tokens only (equal to transformers' T5 loss on the same batch)."""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch
from modelkit import tiny_tokenizer
from test_seq2seq import hf_t5

from lmloop.cli import main
from lmloop.log import read_metrics
from lmloop.models import adapter, build_model, num_params
from lmloop.models.io import load_model
from lmloop.models.seq2seq import Seq2SeqConfig
from lmloop.training.objectives import Seq2SeqObjective

WORDS = "red blue green cat dog bird sun moon tree river stone house".split()
MODEL = ["model.family=seq2seq", "model.positions=relative", "model.hidden_size=32",
         "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=64"]  # fmt: skip
FAST = ["log_every=1", "eval.every=10", "eval.batches=2", "schedule.warmup_steps=3",
        "batch.seq_len=32", "batch.micro_batch=8", "batch.global_batch=8", "optim.lr=3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pairs_file(path, n: int = 160):
    """A task with something to learn: the target is the input's words reversed."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
            f.write(json.dumps({"src": " ".join(words), "tgt": " ".join(words[::-1])}) + "\n")


def _data(tmp_path, *extra: str):
    _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "data"
    args = ["data", "--source", str(tmp_path / "pairs.jsonl"), "--out", str(out)]
    args += ["--input-field", "src", "--target-field", "tgt", "--min-chars", "1"]
    args += ["--near-dedup", "false", "--vocab-size", "300", *extra]
    assert main(args) == 0
    return out


def test_loss_counts_target_tokens_only_and_equals_transformers(tok):
    hf = hf_t5(tok, ff="gated-gelu", tied=False)
    ours = adapter.from_hf_model(hf)
    rows = [([10, 11, 12, 13, 14, 0], [20, 21, 0]), ([15, 16, 0], [22, 23, 24, 25, 0])]
    obj = Seq2SeqObjective(rows, pad_id=tok.pad_id, seed=0, seq_len=16)
    x, mask, y = batch = obj.collate(rows)
    assert obj.units(batch) == 8  # 3 + 5 target tokens (EOS included), no input token
    with torch.no_grad():
        st = obj.step(ours, batch, "cpu", contextlib.nullcontext)
        ref = hf(input_ids=x, attention_mask=mask.long(), labels=y).loss  # mean over labels
    torch.testing.assert_close(st.loss_sum / st.units, ref, rtol=1e-5, atol=1e-5)


def test_param_count_matches_the_built_model():
    for c in (Seq2SeqConfig(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                            num_decoder_layers=1, num_heads=2),
              Seq2SeqConfig(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                            num_heads=2, positions="sinusoidal", feed_forward_proj="relu",
                            tie_word_embeddings=False)):  # fmt: skip
        m = build_model(c)
        assert (c.num_params(), c.num_params(non_embedding=True)) == (
            num_params(m),
            num_params(m, non_embedding=True),
        )


def test_train_seq2seq_from_scratch_learns_and_resumes(tmp_path):
    data = _data(tmp_path)
    run = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(run), "--max-steps", "40",
               "--save-every", "20", *MODEL, *FAST])  # fmt: skip
    assert rc == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert abs(recs[0]["loss"] - math.log(300)) < 1.0  # starts near uniform over the vocab
    assert recs[-1]["loss"] < recs[0]["loss"] - 2.0  # and learns the pairs
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20, 30, 40]
    lm = load_model(run)
    assert lm.model.config.family == "seq2seq" and lm.model.config.positions == "relative"
    # resume from step 20 reproduces steps 21..40 exactly
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-0000040")
    args = ["train", "--data", str(data), "--out", str(run), "--max-steps", "40", "--resume"]
    assert main([*args, "--save-every", "20", *MODEL, *FAST]) == 0
    again = read_metrics(run / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in recs]


def test_train_seq2seq_from_a_t5_folder(tmp_path, tok):
    hf = hf_t5(tok, ff="gated-gelu", tied=True)
    t5 = tmp_path / "t5"
    hf.save_pretrained(str(t5))
    tok.save(t5)
    data = _data(tmp_path, "--tokenizer", str(t5))
    run = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(run), "--init-from", str(t5),
               "--max-steps", "10", *FAST])  # fmt: skip
    assert rc == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert recs[-1]["loss"] < recs[0]["loss"]
    cfg = load_model(run).model.config
    assert cfg.family == "seq2seq" and cfg.num_decoder_layers == 3 and cfg.d_kv == 8
    meta = json.loads((run / "meta.json").read_text())
    assert meta["init_from"] == str(t5.resolve())


def test_family_and_data_must_agree(tmp_path):
    data = _data(tmp_path)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1"]
    assert main([*args, "model.family=llama", "model.hidden_size=32"]) == 2
