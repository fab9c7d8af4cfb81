"""lmloop's OpenAI-compatible server: the FastAPI app (`create_app`) and the chat page.

Run it with `lmloop serve --model M` (lmloop.stages.serve), or build the app yourself:

    from lmloop.server import ServerSettings, create_app
    app = create_app(ServerSettings(model="smollm2-135m-instruct", db="feedback.db"))

Modules: `app` (routes, generation, streaming), `protocol` (request parsing and validation),
`errors` (OpenAI error shape), `feedback` (`POST /v1/feedback`), `auth` (API key), `metrics`
(Prometheus), `slot` (the served model: background load, hot reload, drain), `static/` (the
chat page).
"""

from lmloop.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
