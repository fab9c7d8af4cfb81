"""Config parsing: types, dotted keys, flags, lists, errors reported at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from lmloop.config import format_help, load_yaml, param, parse_args, to_yaml
from lmloop.errors import UserError


@dataclass(frozen=True)
class Optim:
    lr: float = param(1e-3, "peak learning rate")
    betas: list[float] = param([0.9, 0.95], "AdamW betas")


@dataclass(frozen=True)
class Demo:
    data: str = param("", "data dir")
    max_tokens: int = param(16, "tokens to generate")
    resume: bool = param(False, "continue the newest checkpoint")
    source: list[str] = param([], "input paths (repeatable)")
    schedule: Literal["cosine", "linear"] = param("cosine", "LR schedule")
    seed: int | None = param(None, "random seed")
    optim: Optim = param(Optim(), "optimizer")


@dataclass(frozen=True)
class WithPositional:
    __positional__: ClassVar[tuple[str, ...]] = ("reports",)
    reports: list[str] = param([], "report folders")


def test_key_value_and_flags_are_the_same():
    a = parse_args(Demo, ["data=x", "max_tokens=5", "optim.lr=3e-4"])
    b = parse_args(Demo, ["--data", "x", "--max-tokens", "5", "--optim.lr", "3e-4"])
    assert a == b
    assert a.optim.lr == pytest.approx(3e-4) and isinstance(a.max_tokens, int)


def test_bool_flag_and_negation():
    assert parse_args(Demo, ["--resume"]).resume is True
    assert parse_args(Demo, ["--resume", "false"]).resume is False
    assert parse_args(Demo, ["resume=no"]).resume is False
    assert parse_args(Demo, ["--no-resume"]).resume is False


def test_list_flag_appends():
    cfg = parse_args(Demo, ["--source", "a", "--source", "b", "source=c"])
    assert cfg.source == ["a", "b", "c"]


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: d\noptim:\n  lr: 3e-4\nsource: [x, y]\nschedule: linear\nseed: 7\n")
    cfg = parse_args(Demo, [str(p), "--source", "z", "optim.lr=1e-2"])
    assert cfg.optim.lr == pytest.approx(1e-2)
    assert cfg.source == ["z"]  # the command line replaces the file's list, then appends
    assert (cfg.schedule, cfg.seed, cfg.data) == ("linear", 7, "d")
    # YAML 1.1 would read `no` as False; a str field keeps it as the word
    p.write_text("data: no\n")
    assert parse_args(Demo, [str(p)]).data == "no"
    assert load_yaml(p) == {"data": "no"}


def test_unknown_key_did_you_mean_and_all_errors_at_once():
    with pytest.raises(UserError) as e:
        parse_args(Demo, ["optim.lrr=1", "max_tokens=many", "schedule=cosin"])
    msg = e.value.line()
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg
    assert "max_tokens" in msg and "many" in msg
    assert "did you mean 'cosine'" in msg
    assert "\n" not in msg


def test_bad_float_value():
    with pytest.raises(UserError, match="optim.lr: got 'fast', expected a number"):
        parse_args(Demo, ["optim.lr=fast"])


def test_optional_none_and_positional():
    assert parse_args(Demo, ["seed=none"]).seed is None
    assert parse_args(WithPositional, ["a", "b", "c"]).reports == ["a", "b", "c"]
    with pytest.raises(UserError, match="unexpected argument"):
        parse_args(Demo, ["stray"])


def test_help_and_print_config_use_declared_docs():
    text = format_help(Demo, "demo", "a demo")
    assert "--optim.lr" in text and "peak learning rate" in text
    assert "--max-tokens" in text and "tokens to generate" in text
    assert "lr: 0.001" in to_yaml(parse_args(Demo, []))


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_args(Demo, [str(p)])
    with pytest.raises(UserError, match="config file not found"):
        parse_args(Demo, [str(tmp_path / "missing.yaml")])


def test_inline_spec_keeps_flat_flags_and_its_field_defaults():
    from lmloop.stages.generate import ChatConfig, GenerateConfig

    cfg = parse_args(ChatConfig, ["--temperature", "0", "--stop", "a", "--stop", "b"])
    assert (cfg.sampling.temperature, cfg.sampling.max_tokens) == (0.0, 256)  # chat's default
    assert cfg.sampling.stop == ["a", "b"]
    assert parse_args(ChatConfig, ["sampling.top_k=5"]).sampling.top_k == 5
    assert parse_args(GenerateConfig, ["--max-tokens", "7"]).sampling.max_tokens == 7
    assert parse_args(GenerateConfig, []).sampling.temperature == 0.8
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        parse_args(ChatConfig, ["--temprature", "0"])
    assert "--temperature float  [default: 0.7]" in format_help(ChatConfig, "chat", "")


def test_a_nested_spec_given_in_part_keeps_its_enclosing_defaults_at_every_depth():
    from pathlib import Path

    from lmloop.loop.config import LOOP_TRAIN, LoopConfig

    # the loop's train defaults (LoRA r=16 on four projections, no weight decay) are not
    # TrainConfig's (no LoRA, weight decay 0.1): one field given two levels down keeps the rest
    cfg = parse_args(LoopConfig, ["db=x", "base_data=y", "train.lora.alpha=8"])
    assert cfg.train.lora.alpha == 8
    assert (cfg.train.lora.r, cfg.train.lora.targets) == (16, LOOP_TRAIN.lora.targets)
    cfg = parse_args(LoopConfig, ["db=x", "base_data=y", "train.optim.lr=1e-4"])
    assert (cfg.train.optim.lr, cfg.train.optim.weight_decay) == (1e-4, 0.0)
    assert cfg.train.batch == LOOP_TRAIN.batch
    # the shipped YAML names a few of those fields: it runs exactly the defaults it mirrors
    yaml = Path(__file__).resolve().parents[1] / "configs" / "loop" / "default.yaml"
    shipped = parse_args(LoopConfig, [str(yaml)])
    assert shipped == LoopConfig(db="feedback.db", base_data="data/base", work_dir="runs/loop")
