"""locate(): every model spec to the file or folder that holds it; `lmloop models register`
accepts every spec `--model` accepts, through the same function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from modelkit import hf_llama, lmloop_llama, tiny_tokenizer

from lmloop.artifacts import atomic_dir, write_json
from lmloop.cli import main
from lmloop.errors import UserError
from lmloop.models.io import load_model, save_model
from lmloop.registry import Registry
from lmloop.registry import spec as modelspec
from lmloop.registry.spec import locate, run_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model of each kind: checkpoint, run, Hugging Face folder, GGUF file."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    run = root / "run"
    for step, seed in ((10, 1), (20, 2)):
        with atomic_dir(run / "checkpoints" / f"step-{step:07d}") as tmp:
            save_model(
                tmp, lmloop_llama(tok.vocab_size, seed=seed), tok, schema="lmloop.checkpoint"
            )
    write_json(run / "meta.json", {"schema": "lmloop.run", "format_version": 1,
                                   "best": "step-0000010", "latest": "step-0000020"})  # fmt: skip
    hf = root / "hf"
    hf_llama(tok.vocab_size, tied=True).save_pretrained(hf)
    tok.save(hf)
    gguf = root / "m.gguf"
    ckpt = run / "checkpoints" / "step-0000010"
    assert main(["export", "--model", str(ckpt), "--format", "gguf", "--out", str(gguf)]) == 0
    return {"run": run, "ckpt": ckpt, "hf": hf, "gguf": gguf}


def test_locate_every_kind(models, tmp_path, monkeypatch):
    monkeypatch.setattr(modelspec, "installed_models", lambda: {"tiny-gguf": models["gguf"]})
    reg = Registry(tmp_path / "reg")
    assert locate(models["run"], reg) == modelspec.Located(models["ckpt"], "run", "lmloop")
    assert locate(models["ckpt"], reg).kind == "lmloop"
    assert locate(models["hf"], reg) == modelspec.Located(models["hf"], "hf", "hf")
    assert locate(models["gguf"], reg) == modelspec.Located(models["gguf"], "m", "gguf")
    assert locate("tiny-gguf", reg) == modelspec.Located(models["gguf"], "tiny-gguf", "gguf")
    with pytest.raises(UserError, match="unknown model 'tiny-ggfu'.*did you mean 'tiny-gguf'"):
        locate("tiny-ggfu", reg)


def test_run_checkpoint_falls_back_to_the_newest(models, tmp_path):
    assert run_checkpoint(models["run"]) == models["ckpt"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="has no checkpoint yet"):
        run_checkpoint(run)
    for name in ("step-0000020", "step-0000100"):
        (run / "checkpoints" / name).mkdir()
        write_json(run / "checkpoints" / name / "meta.json",
                   {"schema": "lmloop.checkpoint", "format_version": 1})  # fmt: skip
    write_json(run / "meta.json", {"schema": "lmloop.run", "format_version": 1, "best": "gone"})
    assert run_checkpoint(run).name == "step-0000100"


def test_register_accepts_every_model_spec(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(modelspec, "installed_models", lambda: {"tiny-gguf": models["gguf"]})
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    specs = [str(models[k]) for k in ("run", "ckpt", "hf", "gguf")] + ["tiny-gguf", "m@v2"]
    for spec in specs:
        assert main(["models", "register", "m", spec]) == 0, capsys.readouterr().err
    reg = Registry()
    assert [v["version"] for v in reg.versions("m")] == ["v1", "v2", "v3", "v4", "v5", "v6"]
    assert reg.show("m", "v1")["source"] == str(models["ckpt"].resolve())  # the run's best
    assert reg.show("m", "v3")["source"] == str(models["hf"].resolve())
    assert Path(reg.show("m", "v5")["path"]).name == "m.gguf"
    assert reg.show("m", "v6")["sha256"] == reg.show("m", "v2")["sha256"]
    assert main(["models", "register", "m", "nothing-like-this"]) == 2
    assert "unknown model 'nothing-like-this'" in capsys.readouterr().err


def test_registry_spec_with_a_version(models, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    reg = Registry()
    reg.register("m", models["ckpt"])
    reg.register("m", models["run"] / "checkpoints" / "step-0000020")
    reg.promote("m", "v1")
    located = locate("registry:m@v2")
    assert (located.name, located.version, located.kind) == ("m", "v2", "lmloop")
    assert located.path == Path(reg.show("m", "v2")["path"])
    lm = load_model("registry:m@v2")
    assert (lm.name, lm.version) == ("m", "v2")
    newest = load_model(str(models["run"] / "checkpoints" / "step-0000020"))
    ids = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), newest.model(ids), rtol=0, atol=0)
    assert load_model("registry:m").version == "v1"
    with pytest.raises(UserError, match="has no version 'v9'"):
        locate("registry:m@v9")


@pytest.mark.slow
def test_register_the_shipped_model_by_its_short_name(tmp_path, capsys):
    args = ["models", "register", "assistant", "smollm2-135m-instruct"]
    assert main([*args, "--registry", str(tmp_path / "reg")]) == 0, capsys.readouterr().err
    path = Path(Registry(tmp_path / "reg").show("assistant")["path"])
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert json.loads((path.parent.parent / "version.json").read_text())["model_file"]
