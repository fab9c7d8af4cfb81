"""`lmloop eval` on encoder-decoder models: target perplexity equal to the cross-entropy computed
directly from the model, chrF/BLEU/ROUGE-L through sacrebleu and rouge-score on the right
references, batched greedy equal to one-at-a-time greedy, and one-line errors for bad input.

A tiny random seq2seq model (hidden 32) and a paired data dir (`lmloop data` on a word-reversal
task, 40% test) are built once per module.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from modelkit import tiny_tokenizer
from test_perplexity import make_hf_model
from test_seq2seq import greedy, lmloop_seq2seq

from lmloop.cli import main
from lmloop.data.shards import open_pairs
from lmloop.evaluation import seq2seq as evaluate_seq2seq
from lmloop.models import build_model
from lmloop.models.io import load_model, save_model
from lmloop.models.seq2seq import Seq2SeqConfig
from lmloop.stages import evaluate
from lmloop.tokenizer import Tokenizer

WORDS = "red blue green cat dog bird sun moon tree river stone house".split()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A paired data dir and the source pairs it was made from (input text -> target text)."""
    d = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    source: dict[str, str] = {}
    with (d / "pairs.jsonl").open("w") as f:
        for _ in range(60):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
            src, tgt = " ".join(words), " ".join(words[::-1])
            source[src] = tgt
            f.write(json.dumps({"src": src, "tgt": tgt}) + "\n")
    out = d / "data"
    args = ["data", "--source", str(d / "pairs.jsonl"), "--out", str(out), "--input-field", "src",
            "--target-field", "tgt", "--min-chars", "1", "--near-dedup", "false",
            "--decontaminate", "false", "--vocab-size", "300", "--test-fraction", "0.4"]  # fmt: skip
    assert main(args) == 0
    return {"dir": out, "source": source}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, pairs: dict) -> Path:
    """A random seq2seq model with the data's tokenizer, saved as an lmloop model dir."""
    tok = Tokenizer.load(pairs["dir"])
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(
        vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        max_position_embeddings=64, pad_token_id=tok.bos_id, decoder_start_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("s2s")
    save_model(d, build_model(cfg).eval(), tok)
    return d


def _eval(model_dir: Path, pairs: dict, **kw) -> evaluate.EvalResult:
    cfg = evaluate.EvalConfig(
        model=str(model_dir), text=str(pairs["dir"]), split="test", quiet=True, **kw
    )
    return evaluate.run(cfg)


def test_target_perplexity_is_exp_of_mean_target_cross_entropy(model_dir, pairs, tmp_path):
    lm = load_model(model_dir)
    m = lm.model
    test = open_pairs(pairs["dir"], "test")
    assert len(test) >= 10
    # Directly from the model, one pair at a time (no padding): encode the input, feed the
    # start token then the target, cross-entropy on every target token (EOS included).
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(test)):
            a, b = (torch.tensor([x.tolist()]) for x in test[i])
            dec = torch.cat([torch.tensor([[m.config.decoder_start_token_id]]), b[:, :-1]], 1)
            logits = m.decode(dec, *m.encode(a))
            nll += F.cross_entropy(logits[0].double(), b[0], reduction="sum").item()
            n += b.shape[1]
    want = math.exp(nll / n)
    # Padded batches of 4 and the default (one batch) both give it.
    out = tmp_path / "ev"
    res = _eval(model_dir, pairs, batch_size=4, max_new_tokens=4, out=str(out))
    assert res.report["counts"]["tokens"] == n and res.report["counts"]["pairs"] == len(test)
    assert res.token_perplexity == pytest.approx(want, rel=1e-5)
    assert _eval(model_dir, pairs, max_new_tokens=0).token_perplexity == pytest.approx(
        want, rel=1e-5
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["protocol"]["mode"] == "seq2seq" and rep["protocol"]["max_new_tokens"] == 4
    assert rep["bits_per_byte"] == pytest.approx(nll / rep["counts"]["bytes"] / math.log(2))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["schema"] == "lmloop.eval" and set(meta["figures"]) >= {"chrf", "bleu", "rougeL"}


def _oracle(monkeypatch, answer) -> None:
    """Replace the greedy decode: each input's output is `answer(input ids)`."""

    def decode(model, inputs, **kw):
        return [answer(list(x)) for x in inputs]

    monkeypatch.setattr(evaluate_seq2seq, "greedy_decode", decode)


def test_references_scored_against_themselves_are_perfect(model_dir, pairs, tmp_path, monkeypatch):
    test = open_pairs(pairs["dir"], "test")
    target_of = {tuple(a.tolist()): b[:-1].tolist() for a, b in (test[i] for i in range(len(test)))}
    _oracle(monkeypatch, lambda ids: target_of[tuple(ids)])
    out = tmp_path / "ev"
    rep = _eval(model_dir, pairs, out=str(out)).report
    assert rep["chrf"] == pytest.approx(100.0)
    assert rep["bleu"] == pytest.approx(100.0)
    assert rep["rougeL"] == pytest.approx(1.0)
    n = len(test)
    assert rep["labels"]["chrf"] == f"chrF (sacrebleu, corpus, greedy, {n} pairs)"
    sig = rep["protocol"]["signatures"]
    assert sig["chrf"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert sig["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    md = (out / "report.md").read_text()
    assert f"chrF (sacrebleu, corpus, greedy, {n} pairs)" in md and sig["bleu"] in md


def test_metrics_use_the_source_references_pair_by_pair(model_dir, pairs, monkeypatch):
    """Outputs = the inputs themselves: the figures must equal sacrebleu and rouge-score run on
    the original jsonl texts, each input against its own target."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    _oracle(monkeypatch, lambda ids: ids[:-1])
    rep = _eval(model_dir, pairs).report
    tok = Tokenizer.load(pairs["dir"])
    test = open_pairs(pairs["dir"], "test")
    hyps = [tok.decode(test[i][0][:-1].tolist()) for i in range(len(test))]
    refs = [pairs["source"][h] for h in hyps]
    assert rep["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=1e-9)
    assert rep["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rl = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    assert rep["rougeL"] == pytest.approx(sum(rl) / len(rl), abs=1e-12)
    assert 0 < rep["bleu"] < rep["chrf"] < 100  # reversed words: right characters, wrong order


def test_batched_greedy_equals_one_at_a_time():
    """Padded inputs of 3-12 tokens, rows that stop at EOS while others run to the cap: each
    row's output equals the single-row greedy (the one tested against transformers' T5)."""
    tok = tiny_tokenizer()
    model = lmloop_seq2seq(tok)
    with torch.no_grad():  # larger weights than the init, so greedy outputs vary (see hf_t5)
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim == 2 and "embed" not in name:
                p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randint(4, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 12, 7, 5, 9, 4, 11)]  # fmt: skip
    stops = {tok.eos_id}
    want = []
    for x in inputs:
        out = greedy(model, torch.tensor([x]), 10, stops)[1:]  # drop the start token
        want.append(out[:-1] if out and out[-1] in stops else out)
    assert min(map(len, want)) < 9 and max(map(len, want)) == 10 and len(set(map(tuple, want))) > 3
    for bs in (3, None):
        got = evaluate_seq2seq.greedy_decode(
            model, inputs, tokenizer=tok, max_new_tokens=10, stop_ids=stops, batch_size=bs,
            show_progress=False,
        )  # fmt: skip
        assert got == want


def test_bad_input_is_one_line_and_exit_2(model_dir, pairs, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a cat. " * 20)
    token_dir = tmp_path / "tokens"
    assert main(["data", "--source", str(text), "--out", str(token_dir), "--min-chars", "1",
                 "--vocab-size", "300", "--val-fraction", "0", "--test-fraction", "0"]) == 0  # fmt: skip
    decoder_only = make_hf_model(tmp_path / "llama")
    other_tok = tmp_path / "other-tok"
    tok = tiny_tokenizer()
    save_model(other_tok, lmloop_seq2seq(tok), tok)
    capsys.readouterr()
    cases = [
        (model_dir, text, [], "is an encoder-decoder (seq2seq) model"),
        (model_dir, token_dir, [], "'lmloop.data' artifact (token shards, no pairs)"),
        (decoder_only, pairs["dir"], [], "only encoder-decoder (seq2seq) models"),
        (model_dir, pairs["dir"], ["--stride", "4"], "--stride applies to a decoder-only"),
        (model_dir, pairs["dir"], ["--documents"], "--documents applies to a decoder-only"),
        (other_tok, pairs["dir"], [], "tokenized with a different tokenizer"),
        (model_dir, pairs["dir"], ["--max-new-tokens", "65"], "longer than the model's context"),
        (model_dir, pairs["dir"], ["--split", "dev"], "has no split 'dev'"),
    ]
    for model, data, extra, msg in cases:
        rc = main(["eval", "--model", str(model), "--text", str(data), "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], (model, data, extra, err)
