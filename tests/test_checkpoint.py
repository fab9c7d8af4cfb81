"""Checkpoints under faults: a failed save leaves the previous checkpoint whole and resumable;
truncated weights, train state or token shards fail with one line naming the file.

Reuses `tests/test_train.py`'s tiny tokenizer and data dir builder (a tiny Llama, a few steps).
"""

from __future__ import annotations

import errno

import pytest
from test_train import make_data_dir, tok, train  # noqa: F401 - tok is a fixture

from lmloop.cli import main
from lmloop.training import checkpoint as ck


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):  # noqa: F811
    return make_data_dir(tmp_path_factory.mktemp("data") / "d", tok, train_docs=120, val_docs=20)


def _one_line_error(capsys) -> str:
    """The CLI's one error line (log lines may precede it; exit status 2 means it was caught)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmloop: error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_failed_save_keeps_the_previous_checkpoint_resumable(tmp_path, data_dir, capsys, fault):
    run = tmp_path / "run"
    args = ["--data", str(data_dir), "--out", str(run), "--save-every", "2"]
    assert train(*args, "--max-steps", "2") == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-0000002").iterdir()}
    capsys.readouterr()

    real_save = ck.torch.save

    def failing_save(obj, f, *a, **kw):
        if fault == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise PermissionError(errno.EACCES, "Permission denied")

    ck.torch.save = failing_save
    try:
        assert train(*args, "--max-steps", "4", "--resume") == 2
    finally:
        ck.torch.save = real_save
    line = _one_line_error(capsys)
    reason = "No space left on device" if fault == "disk full" else "Permission denied"
    assert "cannot write checkpoint step-0000004" in line and reason in line
    assert "checkpoint step-0000002 is intact" in line and "--resume" in line
    # the previous checkpoint is byte-identical, nothing half-written sits beside it
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]
    after = {p.name: p.read_bytes() for p in (ckpts / "step-0000002").iterdir()}
    assert after == before
    assert ck.read_run(run)["latest"] == "step-0000002"
    # and the run resumes from it once the fault is gone
    assert train(*args, "--max-steps", "4", "--resume") == 0
    assert ck.read_run(run)["latest"] == "step-0000004"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("done") / "run"
    assert train("--data", str(data_dir), "--out", str(run), "--max-steps", "2") == 0
    return run


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_weights_fail_with_one_line_naming_the_file(tmp_path, finished_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "checkpoints" / "step-0000002" / "model.safetensors"
    _truncate(weights)
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "the", "--max-tokens", "2"]) == 2
    line = _one_line_error(capsys)
    assert str(weights) in line


def test_truncated_train_state_fails_with_one_line_naming_the_file(
    tmp_path, finished_run, data_dir, capsys
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = run / "checkpoints" / "step-0000002" / ck.STATE_FILE
    _truncate(state)
    capsys.readouterr()
    args = ["--data", str(data_dir), "--out", str(run), "--max-steps", "4", "--resume"]
    assert train(*args) == 2
    line = _one_line_error(capsys)
    assert str(state) in line


def test_truncated_shard_fails_with_one_line_naming_the_file(tmp_path, tok, capsys):  # noqa: F811
    data = make_data_dir(tmp_path / "d", tok, train_docs=60, val_docs=10)
    shard = data / "train-000000.bin"
    _truncate(shard, 0.9)
    capsys.readouterr()
    assert train("--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2") == 2
    line = _one_line_error(capsys)
    assert str(shard) in line and "truncated" in line
