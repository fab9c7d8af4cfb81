"""Perplexity parity: lmloop.evaluation.perplexity against the reference tools' own code.

- token perplexity equals the Hugging Face strided loop and lm-eval's rolling windows, both
  computed with transformers' own `LlamaForCausalLM` on a tiny random model that we load through
  `lmloop.models.io.load_model` (relative 1e-5, fp32);
- our windows are lm-eval's `get_rolling_token_windows` + `make_disjoint_window`;
- our WikiText detokenizer and word count are lm-eval's `wikitext` task's.

The tiny model + tokenizer fixture (`make_hf_model`) is shared with test_evaluate and
test_lmeval_parity.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmloop.evaluation import perplexity as ppl

CORPUS = [
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a "
    "tactical role @-@ playing video game developed by Sega and Media.Vision . It was released "
    "in January 2011 in Japan , and is the third game in the series . \n",
    " = = Gameplay = = \n \n As with previous games , the player 's squad fights battles , "
    'with 1 @,@ 500 soldiers ( a large army ) and a " nameless " unit . Its story runs '
    "parallel to the first game 's events ; the squad is called Calamity Raven . \n",
    "Once upon a time there was a little fox who lived in the forest. Every morning the fox "
    "ran to the river to drink, and every evening it watched the sun go down over the hills.\n",
]


def make_hf_model(folder: Path, *, context: int = 64, model_vocab: int | None = None) -> Path:
    """A tiny random LlamaForCausalLM + a BPE tokenizer trained on CORPUS, saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=model_vocab or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    # Random init is near-uniform; sharpen it so perplexities differ from the vocab size.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(hf_dir: Path):
    from lmloop.models.io import load_model

    return load_model(str(hf_dir))


def _text() -> str:
    return "".join(CORPUS)


# ---- the references ------------------------------------------------------------------------------
@torch.no_grad()
def hf_strided_reference(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The documented HF loop ("Perplexity of fixed-length models"), summing exact NLL.

    The docs weight each window's mean loss by `num_valid_tokens - batch_size`; we take the loss
    transformers computes and multiply by the number of labels it really averaged over (the
    shifted labels that are not -100), which is the exact sum the loop means to accumulate.
    """
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        outputs = model(input_ids, labels=target_ids)
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(outputs.loss) * n
        n_tokens += n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@torch.no_grad()
def lmeval_rolling_reference(
    model, ids: list[int], prefix: int, max_length: int
) -> tuple[float, int]:
    """lm-eval's loglikelihood_rolling: its own windows, scored as its HF backend does."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total, count = 0.0, 0
    for ctx, cont in map(
        make_disjoint_window, get_rolling_token_windows(ids, prefix, max_length, 1)
    ):
        inp = (ctx + cont)[-(max_length + 1) :][:-1]
        logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
        tail = logp[len(inp) - len(cont) :]
        total += float(tail.gather(1, torch.tensor(cont)[:, None]).sum())
        count += len(cont)
    return -total, count


# ---- pure window logic ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 16, 17, 33, 64, 100])
@pytest.mark.parametrize("window", [2, 8, 16])
def test_rolling_windows_are_lm_evals(n: int, window: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    toks = list(range(1000, 1000 + n))
    ref = [
        ((c + t)[-(window + 1) :][:-1], t)
        for c, t in map(make_disjoint_window, get_rolling_token_windows(toks, 7, window, 1))
    ]
    ours = [(w.inputs, w.targets) for w in ppl.rolling_windows(toks, 7, window)]
    assert ours == ref
    assert sum(len(t) for _, t in ours) == n  # every token predicted exactly once


def test_strided_windows_cover_every_token_once() -> None:
    toks = list(range(1, 50))
    ws = ppl.strided_windows(toks, 0, window=16, stride=5)
    targets = [t for w in ws for t in w.targets]
    assert targets == toks
    assert all(len(w.inputs) <= 15 for w in ws)  # window tokens, the last one only a label


def test_detokenizer_and_counts_are_lm_evals() -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    for page in [*CORPUS, "".join(CORPUS), " = A = \n 3 @.@ 5 ° C ( x ) [ y ] { z } ' q ' N \n"]:
        doc = {"page": page}
        assert ppl.wikitext_detokenize(page) == wikitext_detokenizer(doc)
        res = process_results(doc, [-1.0])
        assert ppl.count_words(page) == res["word_perplexity"][1]
        assert ppl.count_bytes(page) == res["byte_perplexity"][1]


# ---- parity with transformers' model -------------------------------------------------------------
@pytest.mark.parametrize("window,stride", [(64, 16), (32, 32), (24, 10)])
def test_strided_token_perplexity_equals_hf_loop(loaded, hf_model, window, stride) -> None:
    text = _text()
    ids = loaded.tokenizer.encode(text)
    assert len(ids) > 2 * window  # several windows
    nll, n = hf_strided_reference(hf_model, [loaded.tokenizer.bos_id, *ids], window, stride)
    got = ppl.evaluate_texts(loaded, [text], window=window, stride=stride, show_progress=False)
    assert got["counts"]["tokens"] == n
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.parametrize("window", [64, 24])
def test_disjoint_token_perplexity_equals_lm_eval_rolling(loaded, hf_model, window) -> None:
    text = _text()
    ids = loaded.tokenizer.encode(text)
    nll, n = lmeval_rolling_reference(hf_model, ids, loaded.tokenizer.bos_id, window)
    got = ppl.evaluate_texts(loaded, [text], window=window, show_progress=False)
    assert got["counts"]["tokens"] == n == len(ids)
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["protocol"]["mode"] == "disjoint"


def test_documents_mode_scores_each_document_from_the_prefix(loaded, hf_model) -> None:
    nll, n = 0.0, 0
    for doc in CORPUS:
        ids = loaded.tokenizer.encode(doc)
        d_nll, d_n = lmeval_rolling_reference(hf_model, ids, loaded.tokenizer.bos_id, 32)
        nll, n = nll + d_nll, n + d_n
    got = ppl.evaluate_texts(loaded, CORPUS, window=32, documents=True, show_progress=False)
    assert got["counts"]["tokens"] == n
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # Word/byte figures use the same summed log-likelihood over original-text counts.
    words = sum(ppl.count_words(t) for t in CORPUS)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(
        nll / sum(len(t.encode()) for t in CORPUS) / math.log(2), rel=1e-5
    )


def test_batching_does_not_change_the_figures(loaded) -> None:
    one = ppl.evaluate_texts(
        loaded, CORPUS[:2], window=32, stride=16, documents=True, batch_size=1, show_progress=False
    )
    many = ppl.evaluate_texts(
        loaded, CORPUS[:2], window=32, stride=16, documents=True, show_progress=False
    )
    assert many["token_perplexity"] == pytest.approx(one["token_perplexity"], rel=1e-6)
    assert many["counts"] == one["counts"]


def test_stream_mode_joins_documents_with_eos(loaded) -> None:
    got = ppl.evaluate_texts(loaded, CORPUS, window=64, show_progress=False)
    n_tokens = sum(len(loaded.tokenizer.encode(t)) for t in CORPUS)
    assert got["counts"]["tokens"] == n_tokens + len(CORPUS) - 1  # the EOS joiners are predicted
    assert got["protocol"]["joiner_token_id"] == loaded.tokenizer.eos_id


def test_greedy_generation_matches_hf_generate(loaded, hf_model) -> None:
    prompt = "Once upon a time"
    ids = loaded.tokenizer.encode(prompt)
    ref = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    ref_ids = []
    for t in ref:
        if t in loaded.tokenizer.stop_ids:
            break
        ref_ids.append(t)
    out = ppl.greedy_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=8)
    assert out == loaded.tokenizer.decode(ref_ids, skip_special_tokens=True)


def test_head_runs_only_on_scored_positions(loaded) -> None:
    seen: list[tuple[int, ...]] = []
    h = loaded.model.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    try:
        ppl.evaluate_texts(loaded, CORPUS, window=32, stride=8, show_progress=False)
        loaded.model(torch.tensor([[1, 2, 3]]))  # outside an evaluation the head is untouched
    finally:
        h.remove()
    assert seen[:-1] and all(s[0] == 0 for s in seen[:-1])
    assert seen[-1] == (1, 3, loaded.model.config.vocab_size)


def test_scoring_packs_linears_and_restores_them(loaded) -> None:
    from lmloop.engine.fast import PackedLinear

    before = {n: type(m) for n, m in loaded.model.named_modules()}
    inside: list[bool] = []
    h = loaded.model.register_forward_pre_hook(
        lambda m, a: inside.append(any(isinstance(x, PackedLinear) for x in m.modules()))
    )
    try:
        ppl.evaluate_texts(loaded, CORPUS[:1], window=32, show_progress=False)
    finally:
        h.remove()
    assert inside and all(inside)  # the fast layout was in place while scoring
    assert {n: type(m) for n, m in loaded.model.named_modules()} == before  # and is gone after
