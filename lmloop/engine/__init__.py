"""lmloop's inference engine: KV-cache decoding, sampling, continuous batching, streaming.

    from lmloop.engine import Engine, SamplingParams, load_engine
    engine, loaded = load_engine("smollm2-135m-instruct")
    with engine:
        print(engine.generate_text("Once upon a time", SamplingParams(max_tokens=32)))

Everything that generates text in lmloop (the `generate` and `chat` commands, batch jobs, the
HTTP server) consumes `Engine.submit` / `Engine.generate`, one streaming path.

The package itself is torch-free: `lmloop.engine.spec` (the settings configs nest) is imported by
config validation and `--help`, so the names below load their modules on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names __getattr__ serves, for type checkers
    from lmloop.engine.core import Engine, RequestHandle, load_engine  # noqa: F401
    from lmloop.engine.memory import release_memory  # noqa: F401
    from lmloop.engine.params import (  # noqa: F401
        Completion,
        QueueFull,
        SamplingParams,
        StepOutput,
        TokenLogprob,
    )

_HOME = {
    "Engine": "core", "RequestHandle": "core", "load_engine": "core",
    "release_memory": "memory",
    "Completion": "params", "QueueFull": "params", "SamplingParams": "params",
    "StepOutput": "params", "TokenLogprob": "params",
}  # fmt: skip

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lmloop.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmloop.engine.{_HOME[name]}"), name)
