"""The configs of `lmloop models list|show|promote|rollback|register` (torch-free: `--help` and
validation read them; `lmloop/stages/models.py` runs the commands)."""

from __future__ import annotations

from dataclasses import dataclass

from lmloop.config import param

REGISTRY_HELP = "registry folder (default: $LMLOOP_HOME/registry, i.e. ~/.lmloop/registry)"


@dataclass(frozen=True)
class ListConfig:
    __positional__ = ("name",)
    name: str | None = param(None, "list the versions of this model (default: list the names)")
    registry: str | None = param(None, REGISTRY_HELP)
    json: bool = param(False, "print JSON instead of a table")


@dataclass(frozen=True)
class ShowConfig:
    __positional__ = ("name", "version")
    name: str = param(help="model name, or NAME@VERSION")
    version: str | None = param(None, "version to show (default: the current one)")
    registry: str | None = param(None, REGISTRY_HELP)
    plot: str = param(
        "",
        "instead of one version's JSON: write a PNG of every version's gate decision (win rate "
        "with its interval, degenerate answers, base perplexity change) and print it as a table",
    )


@dataclass(frozen=True)
class PromoteConfig:
    __positional__ = ("name", "version")
    name: str = param(help="model name, or NAME@VERSION")
    version: str | None = param(None, "the version to make current (e.g. v2)")
    registry: str | None = param(None, REGISTRY_HELP)


@dataclass(frozen=True)
class RollbackConfig:
    __positional__ = ("name",)
    name: str = param(help="model name")
    registry: str | None = param(None, REGISTRY_HELP)


@dataclass(frozen=True)
class RegisterConfig:
    __positional__ = ("name", "model")
    name: str = param(help="model name to register under (letters, digits, . _ -)")
    model: str = param(
        help="the model to copy into the registry: any --model spec (a checkpoint or run folder, "
        "a Hugging Face folder, a .gguf file, an installed short name, NAME@VERSION)"
    )
    parent: str | None = param(None, "the version this one was derived from (e.g. v1)")
    lineage: str | None = param(None, "a JSON file of lineage (data hashes, config, eval)")
    promote: bool = param(False, "make the new version current")
    registry: str | None = param(None, REGISTRY_HELP)
