"""The router's HTTP app: OpenAI pass-through for every path the server has, the admin
API (cordon, uncordon, drain, config reload, shadow results), ``/health`` and
``/metrics``.

Admin API (``Authorization: Bearer <--admin-key>``)::

    GET  /admin/replicas                        every replica's state
    POST /admin/replicas/{id}/cordon            no new requests
    POST /admin/replicas/{id}/uncordon
    POST /admin/replicas/{id}/drain             cordon, wait for in-flight work; the
         ?wait=SECONDS&migrate=true             answer says safe_to_stop (migrate: move
                                                streams now, replaying them elsewhere)
    GET  /admin/config, POST /admin/config      the TOML config; a bad one is refused
                                                (400, line named) and the old one kept
    GET  /admin/shadow                          the last shadow-traffic results
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from kvasir.router.config import ConfigError, ReplicaSpec, RouterConfig
from kvasir.router.etcd_state import EtcdState
from kvasir.router.fleet import Fleet
from kvasir.router.health import HealthChecker
from kvasir.router.metrics import RouterMetrics
from kvasir.router.policy import RequestKey
from kvasir.router.proxy import Call, Proxy, error_response, prompt_text
from kvasir.router.replica import Replica

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PASS_GET = ("/v1/models", "/version")


class Router:
    """The fleet, its proxy and health checker, and (optionally) etcd sharing."""

    def __init__(
        self,
        cfg: RouterConfig,
        admin_key: str | None = None,
        api_key: str | None = None,
        etcd_url: str | None = None,
        etcd_prefix: str = "/kvasir/router",
        config_text: str | None = None,
        config_path: str | None = None,
        flag_overrides: dict | None = None,
        flag_replicas: tuple[ReplicaSpec, ...] = (),
    ) -> None:
        self.metrics = RouterMetrics()
        self.fleet = Fleet(cfg, self.metrics)
        self.proxy = Proxy(self.fleet, self.metrics, api_key)
        self.proxy.on_eject = self._on_eject  # type: ignore[attr-defined]
        self.health = HealthChecker(self.fleet, self.metrics, self.proxy.client, api_key)
        self.admin_key = admin_key
        self.config_text = config_text
        self.config_path = config_path
        self.flag_overrides = flag_overrides or {}
        self._flag_replicas = flag_replicas  # --replica/--spare: kept across reloads
        self.etcd = EtcdState(etcd_url, etcd_prefix, self._apply_shared) if etcd_url else None
        # Shared state seen before the replica exists locally (e.g. a config reload).
        self._cordons: set[str] = set()
        self._drains: set[str] = set()
        # --replica-dns HOST:PORT: every address HOST resolves to is a replica (a
        # Kubernetes headless Service lists its ready pods this way).
        self.dns: list[tuple[str, int]] = []
        self._discovered: tuple[ReplicaSpec, ...] = ()
        self._discovered_all: set[ReplicaSpec] = set()  # those in the live config
        self.health.before_round = self.discover  # type: ignore[assignment]

    async def start(self) -> None:
        if self.etcd is not None:
            await self.etcd.start()
        await self.health.check_all()
        self.health.start()

    async def discover(self) -> None:
        if not self.dns:
            return
        loop = asyncio.get_running_loop()
        found: list[ReplicaSpec] = []
        for host, port in self.dns:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                logger.warning("cannot resolve %s: %s", host, e)
                continue
            for addr in sorted({str(i[4][0]) for i in infos}):
                url_host = f"[{addr}]" if ":" in addr else addr
                found.append(
                    ReplicaSpec(f"{host}-{addr}".replace("%", "-"), f"http://{url_host}:{port}")
                )
        if tuple(found) != self._discovered:
            self._discovered = tuple(found)
            self._apply(self._base_cfg())
            logger.info("discovered replicas: %s", [r.url for r in found])

    def _base_cfg(self) -> RouterConfig:
        cfg = self.fleet.cfg
        own = tuple(r for r in cfg.replicas if r not in self._discovered_all)
        return replace(cfg, replicas=own)

    def _apply(self, cfg: RouterConfig) -> None:
        """Swap in ``cfg`` plus the discovered replicas, keeping shared cordons."""
        ids = {r.id for r in cfg.replicas}
        extra = tuple(r for r in self._discovered if r.id not in ids)
        self._discovered_all = set(extra)
        self.fleet.apply_config(replace(cfg, replicas=cfg.replicas + extra))
        for r in self.fleet.replicas.values():
            r.cordoned = r.cordoned or r.id in self._cordons
            r.draining = r.draining or r.id in self._drains

    async def stop(self) -> None:
        await self.health.stop()
        if self.etcd is not None:
            await self.etcd.stop()
        await self.proxy.aclose()

    # ------------------------------------------------------------------ shared state

    def _apply_shared(self, key: str, value: str | None) -> None:
        kind, _, rid = key.partition("/")
        if kind == "config" and value is not None:
            if value != self.config_text:
                try:
                    self._reload(value)
                except ConfigError as e:
                    logger.error("config from etcd refused: %s", e)
            return
        r = self.fleet.get(rid)
        if kind == "cordon":
            (self._cordons.add if value is not None else self._cordons.discard)(rid)
            if r is not None:
                r.cordoned = value is not None
        elif kind == "drain":
            (self._drains.add if value is not None else self._drains.discard)(rid)
            if r is not None:
                r.draining = value is not None
        elif kind == "eject" and r is not None and value is not None:
            until = json.loads(value).get("until", 0.0) - time.time()
            if until > 0 and not r.ejected:
                r.ejected_until = time.monotonic() + until
                r.healthy = False
        self.fleet.update_gauges()

    def _on_eject(self, r: Replica) -> None:
        if self.etcd is not None:
            until = time.time() + max(0.0, r.ejected_until - time.monotonic())
            self.proxy._spawn(self.etcd.put(f"eject/{r.id}", json.dumps({"until": until})))

    async def _share(self, key: str, on: bool) -> None:
        if self.etcd is None:
            return
        if on:
            await self.etcd.put(key, "1")
        else:
            await self.etcd.delete(key)

    # ------------------------------------------------------------------ admin actions

    async def cordon(self, r: Replica, on: bool) -> None:
        r.cordoned = on
        if not on:
            r.draining = False
            await self._share(f"drain/{r.id}", False)
        await self._share(f"cordon/{r.id}", on)
        self.fleet.update_gauges()

    async def drain(self, r: Replica, wait_s: float, migrate: bool) -> dict:
        r.cordoned = True
        r.draining = True
        await self._share(f"cordon/{r.id}", True)
        await self._share(f"drain/{r.id}", True)
        self.fleet.update_gauges()
        if migrate:
            for s in list(r.streams):
                s.move()
        deadline = time.monotonic() + wait_s
        while r.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return r.as_dict()

    def _reload(self, text: str) -> None:
        cfg = RouterConfig.from_toml(text, **self.flag_overrides)
        # A replica the config names replaces the --replica flag of the same id.
        named = {r.id for r in cfg.replicas}
        flags = tuple(r for r in self._flag_replicas if r.id not in named)
        self._apply(replace(cfg, replicas=cfg.replicas + flags))
        self.config_text = text
        logger.info(
            "config loaded: %d replicas, policy %s, models %s",
            len(cfg.replicas),
            cfg.policy,
            sorted(cfg.models),
        )

    async def reload(self, text: str) -> None:
        """Validate and swap in ``text``; on error raise ConfigError, old config kept."""
        self._reload(text)
        if self.etcd is not None:
            await self.etcd.put("config", text)

    def reload_file(self) -> None:
        """SIGHUP: re-read --config (a bad file is logged and the old config kept)."""
        if self.config_path is None:
            logger.warning("SIGHUP without --config: nothing to reload")
            return
        try:
            with open(self.config_path) as f:
                text = f.read()
            self._reload(text)
            if self.etcd is not None:
                self.proxy._spawn(self.etcd.put("config", text))
        except (OSError, ConfigError) as e:
            logger.error("config reload refused, keeping the old one: %s", e)


def _authorized(request: Request, key: str | None) -> bool:
    if key is None:
        return False
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key):
        return True
    return hmac.compare_digest(request.headers.get("x-admin-key", ""), key)


def build_app(router: Router) -> FastAPI:
    app = FastAPI(title="kvasir router")
    fleet, proxy = router.fleet, router.proxy

    def admin_denied(request: Request) -> Response | None:
        if router.admin_key is None:
            return error_response(
                403,
                "The admin API is off: start the router with --admin-key.",
                "admin_disabled",
                err_type="permission_error",
            )
        if not _authorized(request, router.admin_key):
            return error_response(
                401,
                "Missing or wrong admin key.",
                "invalid_admin_key",
                err_type="invalid_request_error",
            )
        return None

    def unknown(rid: str) -> Response:
        return error_response(
            404,
            f"Unknown replica id {rid!r}; known: {sorted(fleet.replicas)}",
            "replica_not_found",
            err_type="invalid_request_error",
            param="replica_id",
        )

    @app.get("/health")
    async def health() -> Response:
        n = sum(r.routable for r in fleet.replicas.values())
        if n == 0:
            return error_response(
                503,
                "No healthy replica.",
                "no_healthy_replica",
                retry_after=fleet.cfg.retry_after_s,
            )
        return JSONResponse({"status": "ok", "num_routable_replicas": n})

    @app.get("/metrics")
    async def metrics() -> Response:
        fleet.update_gauges()
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/admin/replicas")
    async def list_replicas(request: Request) -> Response:
        if (d := admin_denied(request)) is not None:
            return d
        return JSONResponse(
            {
                "policy": fleet.policy.name,
                "replicas": [r.as_dict() for r in fleet.replicas.values()],
            }
        )

    @app.post("/admin/replicas/{rid}/{action}")
    async def replica_action(rid: str, action: str, request: Request) -> Response:
        if (d := admin_denied(request)) is not None:
            return d
        r = fleet.get(rid)
        if r is None:
            return unknown(rid)
        if action in ("cordon", "uncordon"):
            await router.cordon(r, action == "cordon")
            return JSONResponse(r.as_dict())
        if action == "drain":
            try:
                wait_s = float(request.query_params.get("wait", "0"))
            except ValueError:
                return error_response(
                    400,
                    "wait must be a number of seconds",
                    "invalid_value",
                    err_type="invalid_request_error",
                    param="wait",
                )
            migrate = request.query_params.get("migrate", "false").lower() in ("1", "true")
            return JSONResponse(await router.drain(r, wait_s, migrate))
        return error_response(
            404,
            f"Unknown action {action!r}: cordon, uncordon or drain",
            "unknown_action",
            err_type="invalid_request_error",
            param="action",
        )

    @app.get("/admin/replicas/{rid}")
    async def get_replica(rid: str, request: Request) -> Response:
        if (d := admin_denied(request)) is not None:
            return d
        r = fleet.get(rid)
        return unknown(rid) if r is None else JSONResponse(r.as_dict())

    @app.get("/admin/config")
    async def get_config(request: Request) -> Response:
        if (d := admin_denied(request)) is not None:
            return d
        return Response(router.config_text or "", media_type="application/toml")

    @app.post("/admin/config")
    async def post_config(request: Request) -> Response:
        if (d := admin_denied(request)) is not None:
            return d
        text = (await request.body()).decode("utf-8", errors="replace")
        try:
            await router.reload(text)
        except ConfigError as e:
            return error_response(
                400,
                f"config refused (the old one is kept): {e}",
                "invalid_config",
                err_type="invalid_request_error",
                param=f"line {e.line}" if e.line else None,
            )
        return JSONResponse(
            {"status": "ok", "replicas": sorted(fleet.replicas), "models": sorted(fleet.cfg.models)}
        )

    @app.get("/admin/shadow")
    async def shadow(request: Request) -> Response:
        if (d := admin_denied(request)) is not None:
            return d
        return JSONResponse({"results": proxy.shadow_log})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        resp = await _forward(request, "/v1/models")
        if resp.status_code != 200 or not fleet.cfg.models:
            return resp
        body = json.loads(bytes(resp.body))
        have = {m["id"] for m in body.get("data", [])}
        for name in fleet.cfg.models:
            if name not in have:
                body["data"].append({"id": name, "object": "model", "owned_by": "kvasir-router"})
        return JSONResponse(body)

    async def _forward(request: Request, path: str) -> Response:
        raw = await request.body()
        body = None
        if raw and "json" in request.headers.get("content-type", "json"):
            try:
                parsed = json.loads(raw)
                body = parsed if isinstance(parsed, dict) else None
            except ValueError:
                body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        session = headers.get(fleet.cfg.session_header)
        user = body.get("user") if body and isinstance(body.get("user"), str) else None
        model = body.get("model") if body and isinstance(body.get("model"), str) else None
        call = Call(
            path=path,
            method=request.method,
            headers=headers,
            body=body,
            raw=raw,
            query=request.url.query,
            key=RequestKey(prompt_text(body), session or user),
            model=model,
            user=session or user,
            stream=bool(body and body.get("stream") is True),
        )
        if path in _PASS_GET:
            call = replace(call, key=RequestKey())
        return await proxy.handle(call)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE"])
    async def v1(rest: str, request: Request) -> Response:
        return await _forward(request, "/v1/" + rest)

    for path in ("/tokenize", "/detokenize", "/version", "/pooling", "/score", "/rerank"):

        async def passthrough(request: Request, _p: str = path) -> Response:
            return await _forward(request, _p)

        app.add_api_route(path, passthrough, methods=["GET", "POST"])
    return app
