"""lmloop's OpenAI-compatible server: the FastAPI app (`create_app`) and the chat page.

Run it with `lmloop serve --model M` (lmloop.stages.serve), or build the app yourself:

    from lmloop.server import ServerSettings, create_app
    app = create_app(ServerSettings(model="smollm2-135m-instruct", db="feedback.db"))

Modules: `app` (`create_app`: wiring and lifespan), `settings` (`ServeConfig`, `ServerSettings`;
torch-free), `routes` (the HTTP routes), `protocol` (request parsing and validation, and the
request -> prompts and sampling settings), `generation` (a request's choices in the engine),
`responses` (whole answers, SSE events, logprobs), `middleware` (body cap, access log), `state`
(what one app holds), `errors` (OpenAI error shape), `feedback` (`POST /v1/feedback`), `auth`
(API key), `metrics` (Prometheus), `slot` (the served model: background load, hot reload,
drain), `static/` (the chat page).
"""

from lmloop.server.app import create_app
from lmloop.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
