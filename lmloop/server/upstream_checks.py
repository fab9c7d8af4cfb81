"""`lmloop serve --upstream`'s start-up checks, synchronous (they run before the server binds):
every replica answers `GET /v1/models` and lists the model asked for; plain http to another host
is warned about. One line (a `UserError`, exit 2) for what is wrong.
"""

from __future__ import annotations

import contextlib
import ipaddress
from urllib.parse import urlsplit

import httpx

from lmloop.errors import UserError
from lmloop.server.upstream_config import base_url


def auth_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def insecure_warning(url: str) -> str | None:
    """A warning for plain http to a host that is not this machine (keys and prompts travel
    readable), else None."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    if host == "localhost":
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    return (
        f"the upstream {url} is plain http to another host: prompts, answers and "
        "--upstream-key travel unencrypted (use https, or a private network)"
    )


def upstream_models(url: str, key: str | None, timeout: float = 5.0) -> list[str]:
    """The model ids the upstream at `url` lists at `GET /v1/models`; UserError when it does
    not answer."""
    try:
        r = httpx.get(base_url(url) + "/v1/models", headers=auth_headers(key), timeout=timeout)
    except httpx.HTTPError as e:
        raise UserError(
            f"the upstream {url} does not answer ({type(e).__name__}: {e or 'no reply'})",
            hint="start it first, or check --upstream",
        ) from None
    return models_from(url, r)


def models_from(url: str, r: httpx.Response) -> list[str]:
    if r.status_code in (401, 403):
        raise UserError(
            f"the upstream {url} refused the key ({r.status_code})",
            hint="set --upstream-key (or LMLOOP_UPSTREAM_KEY)",
        )
    try:
        r.raise_for_status()
        data = r.json()["data"]
        return [str(m["id"]) for m in data]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"the upstream {url} did not answer GET /v1/models as an "
            f"OpenAI-compatible server ({r.status_code}: {str(e)[:120]})"
        ) from None


def pick_model(url: str, ids: list[str], wanted: str | None) -> str:
    """The upstream model to send requests to: `wanted` if listed, else the only one listed."""
    have = ", ".join(ids) or "none"
    if wanted is not None:
        if wanted not in ids:
            raise UserError(
                f"the upstream {url} lists no model '{wanted}'; it has: {have}",
                hint="pick one with --upstream-model",
            )
        return wanted
    if len(ids) != 1:
        raise UserError(
            f"the upstream {url} lists {len(ids)} models ({have}); choose one with --upstream-model"
        )
    return ids[0]


def check_replicas(urls: list[str], key: str | None, wanted: str | None) -> str:
    """The model every replica serves (each answers and lists it); UserError naming the first
    replica that does not, or the two that serve different models."""
    picked = [(url, pick_model(url, upstream_models(url, key), wanted)) for url in urls]
    first_url, model = picked[0]
    for url, other in picked[1:]:
        if other != model:
            raise UserError(
                f"the upstream replicas serve different models: {first_url} '{model}', "
                f"{url} '{other}'",
                hint="replicas must serve one model; name it with --upstream-model",
            )
    return model
