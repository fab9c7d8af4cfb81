"""The CLI surface: fast lazy help, per-stage help, print-config, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmloop.cli import COMMANDS, load_command, main

ROOT = Path(__file__).resolve().parents[1]


def test_top_help_lists_every_stage_without_importing_torch():
    code = (
        "import sys, io, contextlib\n"
        "from lmloop.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    rc = main(['--help'])\n"
        "assert rc == 0\n"
        "assert 'torch' not in sys.modules, 'lmloop --help imported torch'\n"
        "assert 'transformers' not in sys.modules\n"
        "print(buf.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for name, (_, _, desc) in COMMANDS.items():
        assert name in out.stdout and desc in out.stdout


def test_console_script_help():
    exe = Path(sys.executable).with_name("lmloop")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart" in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_stage_help_lists_documented_options(name, capsys):
    cfg_cls, run = load_command(name)
    assert callable(run)
    assert main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmloop {name}")
    import dataclasses

    for f in dataclasses.fields(cfg_cls):
        if f.init:
            assert f.metadata.get("help"), f"{name}: field '{f.name}' has no help text"


def test_print_config(capsys):
    assert main(["train", "--print-config", "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out


def test_bad_key_gets_did_you_mean_and_exit_2(capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "optim.lrr" in err and "did you mean 'optim.lr'" in err


def test_bad_value_exit_2(capsys):
    assert main(["train", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr" in err and "fast" in err and "Traceback" not in err


def test_unknown_command_and_subcommand(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert main(["feedback", "exprt"]) == 2
    assert "did you mean 'export'" in capsys.readouterr().err
    assert main(["models"]) == 2
    assert "needs a subcommand" in capsys.readouterr().err


def test_user_error_through_real_process_has_no_traceback():
    exe = Path(sys.executable).with_name("lmloop")
    out = subprocess.run([str(exe), "train", "optim.lr=fast"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.startswith("lmloop: error:")


def test_every_shipped_config_validates():
    from lmloop.config import parse_args

    stage_of = {"train": "train", "data": "data", "eval": "eval", "loop": "loop",
                "serve": "serve", "generate": "generate", "tokenizer": "tokenizer train"}  # fmt: skip
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        command = stage_of[f.parent.name]
        cfg_cls, _ = load_command(command)
        parse_args(cfg_cls, [str(f)])  # raises UserError on any bad key or value


def test_cli_reference_is_up_to_date():
    from lmloop.cli import reference

    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == reference(), "regenerate: python -m lmloop.cli --reference > docs/cli.md"


def test_every_config_loads_without_torch():
    """`lmloop X --help` and config validation read only torch-free config modules."""
    code = (
        "import sys; from lmloop.cli import COMMANDS, load_config\n"
        "for name in COMMANDS: load_config(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
