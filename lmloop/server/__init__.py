"""lmloop's OpenAI-compatible server: the FastAPI app (`create_app`) and the chat page.

Run it with `lmloop serve --model M` (lmloop.stages.serve), or build the app yourself:

    from lmloop.server import ServerSettings, create_app
    app = create_app(ServerSettings(model="smollm2-135m-instruct", db="feedback.db"))

Each module says what it owns; docs/architecture.md lists them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# `lmloop serve --help` and config validation read ServeConfig from the torch-free, FastAPI-free
# `settings` module; importing the app here would add FastAPI to that (0.2 s -> 0.9 s measured),
# so the names below load their modules on first use (PEP 562), as lmloop.engine does.
if TYPE_CHECKING:
    from lmloop.server.app import create_app  # noqa: F401
    from lmloop.server.settings import ServerSettings  # noqa: F401

_HOME = {"create_app": "app", "ServerSettings": "settings"}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lmloop.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmloop.server.{_HOME[name]}"), name)
