"""The model registry: versions, lineage, promote/rollback with history, copies that survive the
run directory, atomic files, and `lmloop models ...` on the command line."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from lmloop.artifacts import sha256_tree
from lmloop.cli import main
from lmloop.errors import UserError
from lmloop.registry import Registry, default_root, split_spec


def _model(path: Path, seed: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(seed.encode() * 100)
    (path / "config.json").write_text(json.dumps({"family": "llama", "seed": seed}))
    (path / "meta.json").write_text(json.dumps({"schema": "lmloop.model", "format_version": 1}))
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer.json").write_text("{}")
    return path


def test_register_promote_rollback_lineage(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.names() == []
    run1 = _model(tmp_path / "run1" / "ckpt", "one")
    v1 = reg.register("tiny", run1, parent=None, lineage={"data": {"base": "aa" * 32}})
    assert v1 == "v1" and reg.names() == ["tiny"]
    assert reg.current("tiny") is None  # registering does not promote
    reg.promote("tiny", "v1")
    version, path = reg.current("tiny")
    assert version == "v1" and (path / "model.safetensors").read_bytes() == b"one" * 100

    run2 = _model(tmp_path / "run2" / "ckpt", "two")
    lineage = {
        "data": {"base": "aa" * 32, "feedback": "bb" * 32},
        "config": {"lr": 1e-4, "max_steps": 20},
        "eval": {"base_ppl": 12.5, "feedback_loss": 2.1},
    }
    v2 = reg.register("tiny", run2, parent="v1", lineage=lineage)
    assert v2 == "v2"
    assert reg.current("tiny")[0] == "v1"
    reg.promote("tiny", v2)
    assert reg.current("tiny")[0] == "v2"
    v3 = reg.register("tiny", _model(tmp_path / "run3", "three"), parent="v2", lineage={})
    reg.promote("tiny", v3)

    info = reg.show("tiny", "v2")
    assert info["parent"] == "v1" and info["lineage"] == lineage and not info["current"]
    assert info["sha256"] == sha256_tree(run2)
    assert reg.show("tiny")["version"] == "v3"  # default: the current one
    assert reg.show("tiny")["ancestors"] == ["v2", "v1"]
    assert [v["version"] for v in reg.versions("tiny")] == ["v1", "v2", "v3"]
    assert [v["current"] for v in reg.versions("tiny")] == [False, False, True]

    assert reg.rollback("tiny") == "v2"
    assert reg.current("tiny")[0] == "v2"
    assert reg.rollback("tiny") == "v1"
    with pytest.raises(UserError, match="no earlier current version"):
        reg.rollback("tiny")
    assert reg.current("tiny")[0] == "v1"
    actions = [(h["action"], h["version"]) for h in reg.show("tiny")["history"]]
    assert actions == [
        ("register", "v1"), ("promote", "v1"), ("register", "v2"), ("promote", "v2"),
        ("register", "v3"), ("promote", "v3"), ("rollback", "v2"), ("rollback", "v1"),
    ]  # fmt: skip
    # versions are never reused, even after rollbacks
    assert reg.register("tiny", run1, parent="v1", lineage={}) == "v4"


def test_registered_copy_survives_the_run_dir(tmp_path):
    reg = Registry(tmp_path / "reg")
    run = _model(tmp_path / "run" / "ckpt", "weights")
    reg.register("m", run, parent=None, lineage={})
    reg.promote("m", "v1")
    src_ino = (run / "model.safetensors").stat().st_ino
    shutil.rmtree(tmp_path / "run")
    version, path = reg.current("m")
    assert (path / "model.safetensors").read_bytes() == b"weights" * 100
    assert (path / "tokenizer" / "tokenizer.json").read_text() == "{}"
    # same filesystem: hard-linked, not copied
    assert (path / "model.safetensors").stat().st_ino == src_ino
    assert sha256_tree(path) == reg.show("m")["sha256"]
    # no temporary folders left behind
    assert not [p for p in (tmp_path / "reg").rglob(".*") if p.name != ".lock"]


def test_register_a_single_file(tmp_path):
    reg = Registry(tmp_path / "reg")
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    reg.register("g", f, parent=None, lineage={})
    reg.promote("g", "v1")
    _, path = reg.current("g")
    assert path.name == "model.gguf" and path.read_bytes() == f.read_bytes()


def test_resolve_specs_and_errors(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    reg.register("tiny", _model(tmp_path / "a", "a"), parent=None, lineage={})
    reg.register("tiny", _model(tmp_path / "b", "b"), parent="v1", lineage={})
    with pytest.raises(UserError, match="no current version"):
        reg.resolve("registry:tiny")
    reg.promote("tiny", "v2")
    assert reg.resolve("registry:tiny")[:2] == ("tiny", "v2")
    assert reg.resolve("tiny@v1")[:2] == ("tiny", "v1")
    assert split_spec("registry:x@v3") == ("x", "v3") and split_spec("x") == ("x", None)
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        reg.current("tiyn") or reg.versions("tiyn")
    with pytest.raises(UserError, match="no version 'v9'"):
        reg.promote("tiny", "v9")
    with pytest.raises(UserError, match="no version 'v7'"):
        reg.register("tiny", tmp_path / "a", parent="v7", lineage={})
    with pytest.raises(UserError, match="invalid model name"):
        reg.register("../evil", tmp_path / "a", parent=None, lineage={})
    with pytest.raises(UserError, match="not found"):
        reg.register("tiny", tmp_path / "missing", parent=None, lineage={})
    with pytest.raises(UserError, match="JSON"):
        reg.register("tiny", tmp_path / "a", parent=None, lineage={"x": object()})
    assert [v["version"] for v in reg.versions("tiny")] == ["v1", "v2"]  # failures left nothing
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "registry"
    assert Registry().root == tmp_path / "home" / "registry"


def test_concurrent_registers_get_distinct_versions(tmp_path):
    reg = Registry(tmp_path / "reg")
    src = _model(tmp_path / "m", "m")
    got: list[str] = []

    def work() -> None:
        for _ in range(3):
            got.append(Registry(tmp_path / "reg").register("c", src, parent=None, lineage={}))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 13)]
    assert len(reg.versions("c")) == 12


def test_models_cli(tmp_path, capsys):
    r = str(tmp_path / "reg")
    a, b = _model(tmp_path / "a", "a"), _model(tmp_path / "b", "b")
    lineage = tmp_path / "lineage.json"
    lineage.write_text(json.dumps({"eval": {"ppl": 9.5}}))
    assert main(["models", "register", "tiny", str(a), "--registry", r, "--promote"]) == 0
    assert "registered v1 (current)" in capsys.readouterr().out
    assert main(["models", "register", "tiny", str(b), "--parent", "v1", "--lineage",
                 str(lineage), "--registry", r]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["models", "list", "--registry", r]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "current", "versions"] and out[1].split() == [
        "tiny",
        "v1",
        "2",
    ]
    assert main(["models", "list", "tiny", "--registry", r]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:2] == ["*", "v1"] and rows[2].split()[0] == "v2"
    assert main(["models", "promote", "tiny@v2", "--registry", r]) == 0
    assert "current is now v2 (was v1)" in capsys.readouterr().out
    assert main(["models", "show", "tiny", "--registry", r]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v2" and shown["lineage"] == {"eval": {"ppl": 9.5}}
    assert main(["models", "show", "tiny", "v1", "--registry", r]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert main(["models", "rollback", "tiny", "--registry", r]) == 0
    assert "rolled back to v1 (from v2)" in capsys.readouterr().out
    assert main(["models", "list", "--registry", r, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "tiny", "current": "v1", "versions": 2}]

    for argv, needle in [
        (["models", "rollback", "tiny"], "no earlier current version"),
        (["models", "promote", "tiny"], "which version"),
        (["models", "promote", "tiny", "v5"], "no version 'v5'"),
        (["models", "show", "nope"], "no model named 'nope'"),
        (["models", "promote", "tiny@v1", "v2"], "two versions"),
        (["models", "register", "tiny", str(tmp_path / "gone")], "not found"),
        (["models", "rollback"], "missing required key 'name'"),
    ]:
        assert main([*argv, "--registry", r]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmloop: error:") and "\n" not in err and needle in err, err


def test_typos_create_nothing_and_damage_is_a_user_error(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.register("tiny", _model(tmp_path / "a", "a"), parent=None, lineage={})
    reg.promote("tiny", "v1")
    for call in (lambda: reg.promote("tinny", "v1"), lambda: reg.rollback("tinny")):
        with pytest.raises(UserError, match="did you mean 'tiny'"):
            call()
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["tiny"]
    shutil.rmtree(tmp_path / "reg" / "tiny" / "versions" / "v1")
    with pytest.raises(UserError, match="unreadable"):
        reg.current("tiny")
