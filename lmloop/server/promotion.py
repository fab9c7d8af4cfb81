"""A registry promotion carried to the upstream (`lmloop serve --upstream ... --upstream-reload`).

The `Promoter` polls the registry's current version of `registry:NAME` (every `--registry-poll`
seconds, the signal the local engine's hot reload follows). When it moves:

1. the version is exported in the upstream's format (`--upstream-format`): `adapter` (a LoRA
   adapter folder over the version the upstream served when lmloop started, its base model:
   lmloop.export.adapter), `model` (the registry's folder as stored), `hf` (a Hugging Face
   folder, lmloop.export.hf) or `gguf` (lmloop.export.gguf), under
   `$LMLOOP_HOME/upstream/NAME/`;
2. every replica is told, all at once: `--upstream-reload lora` calls its
   `POST /v1/load_lora_adapter` (vLLM) with `lora_name` NAME-VERSION and `lora_path`; any other
   value is a command run once per replica with `{path}`, `{version}`, `{name}`, `{url}` and
   `{replica}` filled in (no shell), after the requests in flight have finished (new ones wait),
   so no answer of the old model is labelled with the new version;
3. the new model name is sent a health prompt on every replica until each answers (within
   `--upstream-reload-timeout`), and only then do new requests go to it under the new version.

Anything that fails leaves the old route serving on every replica and says so: the log,
`promotion` in `/health` and `/v1/lmloop/versions` (`{"version", "state": "failed", "live":
false, "error"}`), and `lmloop_upstream_promotions_total{result="failed"}` in `/metrics`. With a
command, the replicas whose command succeeded are restarted again on the old version (the
rollback) before the waiting requests go on; a replica that then does not answer the old
version is marked stale and left out of rotation (lmloop.server.routing) until a promotion
reloads it: of another version, or of the served one again (the registry rolled back or
promoted to it), which restarts every replica on it. A failed version is not retried until the
registry's current version changes again.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch
from prometheus_client import Counter

from lmloop.artifacts import lmloop_home
from lmloop.errors import UserError
from lmloop.export.config import GGUF_FAMILIES
from lmloop.models.io import load_model
from lmloop.registry import Registry
from lmloop.server.upstream_config import LORA

if TYPE_CHECKING:
    from lmloop.server.routing import Replica
    from lmloop.server.upstream import UpstreamBackend

log = logging.getLogger(__name__)

HEALTH_PROMPT = "Say OK."


@dataclass(frozen=True)
class Route:
    """Where new requests go: the name the upstream serves and the version it maps to."""

    upstream_model: str
    version: str
    sha256: str = ""


class PromotionFailed(Exception):
    pass


def export_version(
    name: str, version: str, fmt: str, *, base: str | None = None, rank: int = 16,
    root: Path | None = None,
) -> Path:  # fmt: skip
    """The path of registered `name@version` in format `fmt` (adapter | model | hf | gguf; an
    adapter is over version `base`); exports are written once (atomically) and reused, as
    versions never change."""
    # lmloop.export.hf imports transformers (~2.2 s): only a promotion to an upstream needs it,
    # not every `lmloop serve` start.
    from lmloop.export.adapter import export_adapter
    from lmloop.export.gguf import export_gguf
    from lmloop.export.hf import export_hf

    reg = Registry()
    _, _, path = reg.resolve(f"{name}@{version}")
    if fmt == "model":
        return path
    root = root or lmloop_home() / "upstream" / name
    kind = {"gguf": f"{version}.gguf", "hf": f"{version}-hf"}
    out = root / kind.get(fmt, f"{version}-adapter-over-{base}-r{rank}")
    if out.exists():
        return out
    lm = load_model(str(path), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "adapter":
        if base is None:
            raise UserError("an adapter needs the base version the upstream started with")
        base_lm = load_model(str(reg.resolve(f"{name}@{base}")[2]), dtype=torch.float32)
        got = export_adapter(base_lm, lm, out, rank=rank)
        log.info("%s@%s as a rank-%d adapter over %s: %d layers, %.2e of the difference lost",
                 name, version, rank, base, got["modules"], got["loss"])  # fmt: skip
    elif fmt == "hf":
        export_hf(lm, out)
    else:
        family = lm.model.config.family
        if family not in GGUF_FAMILIES:
            raise UserError(f"GGUF export supports the {', '.join(GGUF_FAMILIES)} family only, "
                            f"not '{family}'")  # fmt: skip
        export_gguf(lm, out)
    return out


def reload_argv(
    command: str, path: Path, version: str, name: str, url: str = "", replica: int = 0
) -> list[str]:
    """The reload command's argv with `{path}`, `{version}`, `{name}`, `{url}` and `{replica}`
    filled in (no shell)."""
    fill = {"{path}": str(path), "{version}": version, "{name}": name, "{url}": url,
            "{replica}": str(replica)}  # fmt: skip
    argv = []
    for arg in shlex.split(command):
        for k, v in fill.items():
            arg = arg.replace(k, v)
        argv.append(arg)
    return argv


async def run_reload(argv: list[str], timeout: float) -> None:
    """Run the reload command; PromotionFailed when it is missing, fails or overruns."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as e:
        raise PromotionFailed(
            f"reload command {argv[0]!r} could not run: {e.strerror or e}"
        ) from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise PromotionFailed(f"reload command ran past {timeout:.0f}s and was killed") from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise PromotionFailed(
            f"reload command exited with status {proc.returncode}"
            + (f": {tail[0][:300]}" if tail[0] else "")
        )


class Promoter:
    """Follows the registry and moves the upstream (and the route) to its current version."""

    def __init__(self, backend: UpstreamBackend):
        self.b = backend
        self.base: Route | None = None  # what the upstream served when lmloop started
        self.last: dict[str, Any] | None = None  # the last promotion, as the routes show it
        self.failed: str | None = None  # a version that failed: not retried until another
        self.count = Counter(
            "lmloop_upstream_promotions",
            "promotions carried to the upstream, by version and result (live, failed)",
            ["version", "result"],
            registry=backend.state.metrics.registry,
        )

    @staticmethod
    def sha256(name: str, version: str) -> str:
        try:
            return str(Registry().show(name, version).get("sha256", ""))
        except UserError:
            return ""

    async def follow(self, interval: float) -> None:
        name = self.b.registry_name()
        assert name is not None
        self.base = self.b.route
        while True:
            await asyncio.sleep(interval)
            try:
                cur = await asyncio.to_thread(Registry().current, name)
                route = self.b.route
                version = None if cur is None else str(cur[0])
                if version is None or route is None or version == self.failed:
                    continue
                # the served version again while a replica is stale (its rollback failed, and
                # the registry was rolled back to what the others serve): reload every replica
                # on it, or that replica stays out for good
                stale = any(r.stale is not None for r in self.b.pool.replicas)
                if version == route.version and not stale:
                    continue
                await self.promote(name, version)
            except Exception as e:  # noqa: BLE001 - a bad version must not stop the server
                log.exception("following the registry failed: %s", e)

    def _report(self, version: str, state: str, error: str | None = None, **kw: Any) -> None:
        self.last = {"version": version, "state": state, "live": state == "live",
                     "error": error, "at": time.time(), **kw}  # fmt: skip

    async def promote(self, name: str, version: str) -> bool:
        """Carry `name@version` to every replica; True when it serves (and is labelled) now."""
        b = self.b
        old = b.route
        assert old is not None
        up = b.up
        deadline = time.monotonic() + up.upstream_reload_timeout
        self._report(version, "reloading", previous=old.version)
        log.info("registry moved %s to %s; carrying it to the upstream", name, version)
        path: Path | None = None
        try:
            if up.upstream_reload is None:
                raise PromotionFailed("no --upstream-reload is set, so the upstream was not told")
            fmt = up.export_format
            base = self.base or old
            if up.upstream_reload == LORA and fmt == "adapter" and version == base.version:
                # back to the version the upstream started with: its own model, no adapter
                await self._on_each(lambda rep: self._health(rep, base.upstream_model, deadline))
                b.route = base
            elif up.upstream_reload == LORA:
                path = await self._export(name, version, fmt, base, deadline)
                model = f"{name}-{version}"
                await self._on_each(lambda rep: self._load_adapter(rep, model, path, deadline))
                await self._on_each(lambda rep: self._health(rep, model, deadline))
                b.route = Route(model, version, self.sha256(name, version))
            else:
                path = await self._export(name, version, fmt, base, deadline)
                await b.drain(b.settings.drain_timeout)
                try:
                    model = await self._restart_all(name, version, path, old, base, deadline)
                    b.route = Route(model, version, self.sha256(name, version))
                finally:
                    b.open.set()
        except PromotionFailed as e:
            msg = f"{e}; {old.version} keeps serving"
            stale = [r.url for r in b.pool.replicas if r.stale is not None]
            if stale:
                msg += f" (not on {', '.join(stale)}: out of rotation, {old.version} not answered)"
            log.error("promotion of %s@%s is not live: %s", name, version, msg)
            self.failed = version
            self._report(version, "failed", msg, previous=old.version)
            self.count.labels(version, "failed").inc()
            return False
        self.failed = None
        extra = {"path": str(path)} if path is not None else {}
        self._report(version, "live", previous=old.version, **extra)
        self.count.labels(version, "live").inc()
        log.info("upstream serves %s@%s as %s", name, version, b.route.upstream_model)
        return True

    async def _export(self, name: str, version: str, fmt: str, base: Route,
                      deadline: float) -> Path:  # fmt: skip
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(export_version, name, version, fmt, base=base.version,
                                  rank=self.b.up.upstream_lora_rank),
                _left(deadline),
            )  # fmt: skip
        except asyncio.TimeoutError:
            raise PromotionFailed(f"export as {fmt} ran past the reload timeout") from None
        except Exception as e:  # noqa: BLE001 - reported as the promotion's failure
            msg = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            raise PromotionFailed(f"export as {fmt} failed: {msg}") from None

    async def _on_each(self, step: Callable[[Replica], Awaitable[Any]]) -> None:
        """`step` on every replica at once; PromotionFailed naming each replica it failed on."""
        reps = self.b.pool.replicas
        got = await asyncio.gather(*(step(r) for r in reps), return_exceptions=True)
        failed = [(r, e) for r, e in zip(reps, got, strict=True) if isinstance(e, BaseException)]
        for _, e in failed:
            if not isinstance(e, PromotionFailed):
                raise e
        if failed:
            raise PromotionFailed("; ".join(_on(r, e) for r, e in failed))

    async def _restart(self, rep: Replica, path: Path, version: str, name: str,
                       deadline: float) -> str:  # fmt: skip
        """The reload command for one replica, then its model's health prompt -> the model."""
        cmd = self.b.up.upstream_reload or ""
        await run_reload(reload_argv(cmd, path, version, name, rep.url, rep.index),
                         _left(deadline))  # fmt: skip
        model = self.b.up.upstream_model or await self._only_model(rep, deadline)
        await self._health(rep, model, deadline)
        return model

    async def _restart_all(self, name: str, version: str, path: Path, old: Route, base: Route,
                           deadline: float) -> str:  # fmt: skip
        """Every replica restarted on `version` -> its model name; when one fails, those that
        restarted are restarted on `old` again (the rollback) and PromotionFailed."""
        reps = self.b.pool.replicas
        got = await asyncio.gather(*(self._restart(r, path, version, name, deadline)
                                     for r in reps), return_exceptions=True)  # fmt: skip
        for e in got:
            if isinstance(e, BaseException) and not isinstance(e, PromotionFailed):
                raise e
        models = {m for m in got if isinstance(m, str)}
        if len(models) == 1 and len(got) == len(reps) and all(isinstance(m, str) for m in got):
            for r in reps:
                r.stale = None
            return models.pop()
        why = "; ".join(_on(r, e) for r, e in zip(reps, got, strict=True)
                        if isinstance(e, BaseException))  # fmt: skip
        if not why:
            why = f"the replicas list different models after the reload ({', '.join(models)})"
        back = time.monotonic() + min(self.b.up.upstream_reload_timeout, 120.0)
        old_path = None
        if any(isinstance(m, str) for m in got):
            try:
                old_path = await self._export(name, old.version, self.b.up.export_format, base,
                                              back)  # fmt: skip
            except PromotionFailed as e:
                why += f"; the rollback's {e}"

        async def roll_back(rep: Replica, reloaded: bool) -> None:
            try:
                if reloaded:
                    if old_path is None:
                        raise PromotionFailed("no export of the old version")
                    await run_reload(reload_argv(self.b.up.upstream_reload or "", old_path,
                                                 old.version, name, rep.url, rep.index),
                                     _left(back))  # fmt: skip
                await self._health(rep, old.upstream_model, min(back, time.monotonic() + 10))
                rep.stale = None
            except PromotionFailed as e:
                rep.stale = f"{version} failed and {old.version} does not answer: {e}"[:300]

        await asyncio.gather(
            *(roll_back(r, isinstance(m, str)) for r, m in zip(reps, got, strict=True))
        )
        raise PromotionFailed(why)

    async def _load_adapter(self, rep: Replica, lora_name: str, path: Path,
                            deadline: float) -> None:  # fmt: skip
        client = self.b.client
        assert client is not None
        body = {"lora_name": lora_name, "lora_path": str(path)}
        url = rep.base + "/v1/load_lora_adapter"
        try:
            r = await client.post(url, json=body, timeout=_left(deadline))
        except httpx.HTTPError as e:
            raise PromotionFailed(f"POST /v1/load_lora_adapter: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            raise PromotionFailed(
                f"POST /v1/load_lora_adapter answered {r.status_code}: {r.text[:300]}"
            )

    async def _only_model(self, rep: Replica, deadline: float) -> str:
        """After a restart without --upstream-model: the one model the replica lists now."""
        client = self.b.client
        assert client is not None
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                r = await client.get(rep.base + "/v1/models",
                                     timeout=max(0.5, min(5.0, _left(deadline))))  # fmt: skip
                ids = [str(m["id"]) for m in r.json()["data"]]
                if len(ids) == 1:
                    return ids[0]
                last = f"it lists {len(ids)} models ({', '.join(ids)}); set --upstream-model"
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                last = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.25)
        raise PromotionFailed(f"the upstream did not list its model after the reload ({last})")

    async def _health(self, rep: Replica, model: str, deadline: float) -> None:
        """Until `deadline`: send `model` on `rep` a one-token health prompt until it answers."""
        last = "no answer"
        while True:
            try:
                await self.b.answers(rep, model, max(0.5, min(30.0, _left(deadline))))
                return
            except (httpx.HTTPError, ValueError, AttributeError, RuntimeError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise PromotionFailed(f"{model} did not answer the health prompt ({last})")
            await asyncio.sleep(0.25)


def _on(rep: Replica, e: BaseException) -> str:
    """A replica's failure for the report: `URL: why`."""
    return f"{rep.url}: {e}"


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
