"""The HF <-> lmloop adapter: logits equal to transformers' on tiny random models, both ways."""

from __future__ import annotations

import pytest
import torch
from modelkit import (
    cached_decode_logits,
    hf_gpt2,
    hf_llama,
    lmloop_gpt,
    lmloop_llama,
    save_hf,
    tiny_tokenizer,
)

from lmloop.errors import UserError
from lmloop.models import adapter
from lmloop.models.io import load_model

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(vocab: int, B: int = 2, T: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 4), (True, 1)])
def test_hf_llama_folder_loads_with_equal_logits(tmp_path, tok, tied, kv_heads):
    hf = hf_llama(tok.vocab_size, tied=tied, kv_heads=kv_heads)
    save_hf(hf, tok, tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.kind == "hf" and len(lm.version) == 12
    assert lm.model.config.tie_word_embeddings is tied
    assert lm.model.config.num_key_value_heads == kv_heads
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lm.model(ids), ref, **TOL)
        # the inference path: prefill 5 tokens, then decode one at a time through the KV cache
        torch.testing.assert_close(cached_decode_logits(lm.model, ids, 5), ref, **TOL)
    if tied:
        assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [True, False])
def test_hf_gpt2_folder_loads_with_equal_logits(tmp_path, tok, tied):
    hf = hf_gpt2(tok.vocab_size, tied=tied)
    save_hf(hf, tok, tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.model.config.family == "gpt" and lm.model.config.positions == "learned"
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lm.model(ids), ref, **TOL)
        torch.testing.assert_close(cached_decode_logits(lm.model, ids, 3), ref, **TOL)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_round_trip_through_transformers(tok, tied):
    ours = lmloop_llama(tok.vocab_size, tied=tied)
    hf = adapter.to_hf_model(ours)
    back = adapter.from_hf_model(hf)
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), **TOL)
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)
    assert back.config == ours.config


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_gpt_round_trip_including_sinusoidal_as_fixed_wpe(tok, positions):
    ours = lmloop_gpt(tok.vocab_size, positions=positions)
    hf = adapter.to_hf_model(ours)
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), **TOL)
        back = adapter.from_hf_model(hf)
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)
    # a wpe that is exactly the formula's table comes back as sinusoidal positions
    assert back.config.positions == positions
    assert back.config == ours.config


def test_unsupported_configs_are_refused():
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(UserError, match="rope scaling 'llama3'"):
        adapter.llama_config_from_hf({**base, "rope_parameters": llama3})
    with pytest.raises(UserError, match="rope scaling 'linear'"):
        adapter.llama_config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(UserError, match="hidden_act 'gelu'"):
        adapter.llama_config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(UserError, match="model_type 'bert'"):
        adapter.from_hf({"model_type": "bert"}, {})
    gpt = {"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2}
    with pytest.raises(UserError, match="activation_function 'relu'"):
        adapter.gpt_config_from_hf({**gpt, "activation_function": "relu"})
    # transformers 4.x spelling of plain rope is accepted
    cfg = adapter.llama_config_from_hf({**base, "rope_theta": 500.0, "rope_scaling": None})
    assert cfg.rope_theta == 500.0


def test_gguf_rotary_permutation_is_inverted_by_transformers_reader():
    """llama.cpp's q/k row order, undone by the permutation transformers' GGUF loader applies."""
    n_head, hd, c = 3, 8, 5
    w = torch.randn(n_head * hd, c)
    permuted = adapter._permute_rotary(w, n_head)
    assert not torch.equal(permuted, w)
    # transformers' reverse permute (integrations/ggml: reshape(n, hd/2, 2) -> swap -> reshape)
    undone = permuted.reshape(n_head, hd // 2, 2, c).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(undone, w)


def test_a_load_fills_no_meta_weights_and_leaves_nn_init_as_it_was():
    """A model is built on the meta device and then given the loaded weights. nn.init's fills
    skip the meta tensors (filling one imports torch._dynamo first: 1.3-2.3 s of every process
    that loads a model), and the empty CPU tensors are made without `empty_like` of a meta
    tensor (which imports sympy); the loaded model is the one saved, fills of real tensors fill,
    and nn.init is itself again afterwards. In a fresh interpreter, where nothing imported
    torch._dynamo before."""
    import subprocess
    import sys

    code = """
import sys, torch
from lmloop.models import build_model
from lmloop.models.adapter import _meta_fills_skipped, build_loaded
from lmloop.models.llama import LlamaConfig
fills = dict(vars(torch.nn.init))
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
torch.manual_seed(0)
src = build_model(cfg).eval()
dyn_before = "torch._dynamo" in sys.modules or "sympy" in sys.modules
loaded = build_loaded(cfg, src.state_dict())
ids = torch.arange(10)[None]
with torch.no_grad():
    same = torch.equal(src(ids), loaded(ids))
with _meta_fills_skipped():
    real = torch.nn.init.normal_(torch.zeros(1000)).std().item()
print(dyn_before, "torch._dynamo" in sys.modules or "sympy" in sys.modules, same, real > 0.5,
      dict(vars(torch.nn.init)) == fills)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True", "True", "True"], out.stdout
