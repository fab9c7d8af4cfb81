"""The seq2seq family against transformers' T5: logits and greedy outputs equal (1e-5) both ways.

Tiny random T5s are built in-process (hidden 32, 2 encoder and 3 decoder layers, 8 position
buckets so the logarithmic ones are reached); weights move through the production adapter
(`load_model` on a saved HF folder, `lmloop export --format hf` back to one).
"""

from __future__ import annotations

import pytest
import torch
from modelkit import tiny_tokenizer

from lmloop.errors import UserError
from lmloop.models import adapter, build_model
from lmloop.models.io import load_model, save_model
from lmloop.models.seq2seq import Seq2SeqConfig, relative_bucket, shift_right

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def hf_t5(tok, *, ff: str, tied: bool, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=tok.vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj=ff,
        dropout_rate=0.0,
        tie_word_embeddings=tied,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
        decoder_start_token_id=tok.pad_id,
    )
    model = T5ForConditionalGeneration(cfg).eval()
    if not tied:  # transformers 5 ties T5's head regardless; give it its own weights
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # non-trivial norm weights, so a swapped norm would show
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:  # large enough that positions matter
                p.normal_(0.0, 1.0)
            elif p.ndim == 2 and "shared" not in name and "lm_head" not in name:
                p.normal_(0.0, 0.3)  # HF's init gives greedy runs of one repeated token
    return model


def saved_seq2seq(directory) -> dict:
    """A tiny seq2seq model with large random weights (outputs that vary), saved to `directory`."""
    from lmloop.models.io import save_model

    tok = tiny_tokenizer()
    model = lmloop_seq2seq(tok).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_model(directory, model, tok)
    return {"dir": directory, "model": model, "tok": tok}


def lmloop_seq2seq(
    tok, *, positions: str = "relative", tied: bool = True, dec_layers: int = 3, seed: int = 0
):
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=dec_layers,
        num_heads=4,
        positions=positions,  # type: ignore[arg-type]
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        scale_decoder_outputs=tied,
        pad_token_id=tok.pad_id,
        decoder_start_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _batch(vocab: int):
    """Two inputs, the second right-padded (mask False), and decoder inputs of 10 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, 14), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False
    dec = torch.randint(4, vocab, (2, 10), generator=g)
    dec[:, 0] = 1  # the decoder start (pad) token
    return ids, mask, dec


def greedy(model, ids: torch.Tensor, n: int, stops: set[int] | None = None) -> list[int]:
    """Our greedy decode through the cache: start token, then up to n tokens or a stop (EOS)."""
    c = model.config
    cache = model.new_cache(1, n + 1)
    enc, mask = model.encode(ids)
    out, nxt = [c.decoder_start_token_id], c.decoder_start_token_id
    for t in range(n):
        step = torch.tensor([[nxt]])
        logits = model.decode(step, enc, mask, positions=torch.tensor([[t]]), cache=cache)
        enc = mask = None  # the cache holds the cross-attention keys/values from now on
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in (stops or {c.eos_token_id}):
            break
    return out


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' forward, argmax appended, no cache (its generate() cannot run T5s with
    fewer encoder than decoder layers: its cache is sized by num_layers)."""
    out = [hf.config.decoder_start_token_id]
    for _ in range(n):
        logits = hf(input_ids=ids, decoder_input_ids=torch.tensor([out])).logits
        out.append(int(logits[0, -1].argmax()))
        if out[-1] == hf.config.eos_token_id:
            break
    return out


def hf_generate(hf, ids: torch.Tensor, n: int) -> list[int]:
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, num_beams=1)
    return out[0].tolist()


@pytest.mark.parametrize("ff,tied", [("gated-gelu", False), ("relu", True), ("gated-gelu", True)])
def test_hf_t5_folder_loads_with_equal_logits_and_greedy(tmp_path, tok, ff, tied):
    hf = hf_t5(tok, ff=ff, tied=tied)
    hf.save_pretrained(str(tmp_path))
    tok.save(tmp_path)
    lm = load_model(str(tmp_path))
    cfg = lm.model.config
    assert lm.kind == "hf" and cfg.family == "seq2seq"
    assert (cfg.tie_word_embeddings, cfg.scale_decoder_outputs, cfg.num_decoder_layers) == (
        tied,
        tied,
        3,
    )
    ids, mask, dec = _batch(tok.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
        torch.testing.assert_close(lm.model(ids, dec, mask), ref, **TOL)
        for row in range(2):
            one = ids[row : row + 1, : int(mask[row].sum())]
            assert greedy(lm.model, one, 12) == hf_greedy(hf, one, 12)


@pytest.mark.parametrize("tied", [True, False])
def test_export_to_t5_folder_transformers_loads_equal(tmp_path, tok, tied):
    from transformers import T5ForConditionalGeneration

    from lmloop.export.config import ExportConfig
    from lmloop.stages.export import run as export

    ours = lmloop_seq2seq(tok, tied=tied, dec_layers=2)  # 2: generate() needs equal stacks
    save_model(tmp_path / "model", ours, tok)
    export(ExportConfig(model=str(tmp_path / "model"), out=str(tmp_path / "hf")))
    hf = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask, dec = _batch(tok.vocab_size)
    with torch.no_grad():
        ref = ours(ids, dec, mask)
        got = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
        torch.testing.assert_close(got, ref, **TOL)
        for row in range(2):
            one = ids[row : row + 1, : int(mask[row].sum())]
            # generate(): the exported generation_config.json (decoder start, EOS) is complete
            assert hf_generate(hf, one, 12) == greedy(ours, one, 12, tok.stop_ids)
        # and back: the exported folder loads as the same model
        back = load_model(str(tmp_path / "hf")).model
        torch.testing.assert_close(back(ids, dec, mask), ref, rtol=0, atol=0)
    assert back.config.tie_word_embeddings is tied


@pytest.mark.parametrize("positions", ["relative", "sinusoidal"])
def test_cached_decode_equals_full_forward(tok, positions):
    model = lmloop_seq2seq(tok, positions=positions)
    ids, mask, dec = _batch(tok.vocab_size)
    with torch.no_grad():
        full = model(ids, dec, mask)
        enc, m = model.encode(ids, mask)
        cache = model.new_cache(2, 16)
        pos = torch.arange(10)[None].expand(2, 10)
        outs = [model.decode(dec[:, :4], enc, m, positions=pos[:, :4], cache=cache)]
        assert cache.cross is not None and len(cache.cross) == 3
        for t in range(4, 10):  # no encoding passed: the cross-attention cache is read
            outs.append(model.decode(dec[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache))
        torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


@pytest.mark.parametrize("positions", ["relative", "sinusoidal"])
def test_input_padding_changes_nothing(tok, positions):
    model = lmloop_seq2seq(tok, positions=positions)
    ids, mask, dec = _batch(tok.vocab_size)
    with torch.no_grad():
        padded = model(ids, dec, mask)[1]
        alone = model(ids[1:, :9], dec[1:])[0]
    torch.testing.assert_close(padded, alone, **TOL)


def test_sinusoidal_is_refused_by_t5_export_and_bad_configs_by_name(tok):
    model = lmloop_seq2seq(tok, positions="sinusoidal")
    with pytest.raises(UserError, match="no Hugging Face T5 equivalent"):
        adapter.to_hf(model.config, model.state_dict())
    with pytest.raises(UserError, match="feed_forward_proj 'swish'"):
        Seq2SeqConfig(feed_forward_proj="swish")
    with pytest.raises(UserError, match="model_type 'bert'"):
        adapter.from_hf({"model_type": "bert"}, {})


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-200, 200)[None, :]
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
        torch.testing.assert_close(relative_bucket(rel, bidirectional, 32, 128), ref)


def test_shift_right_is_teacher_forcing():
    target = torch.tensor([[5, 6, 7, 0], [8, 0, -100, -100]])
    assert shift_right(target, 1, 1).tolist() == [[1, 5, 6, 7], [1, 8, 0, 1]]
