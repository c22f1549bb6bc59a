"""Active health checks: ``GET /health`` on every replica each ``health_interval_s``
(its load and ``draining`` flag come back with it), ``GET /v1/models`` for the names it
serves (LoRA adapters included), and a one-token canary completion every
``canary_interval_s``. A failed check takes the replica out; an ejected replica is
probed again once its back-off has passed and comes back on the first good probe."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from kvasir.router.fleet import Fleet
from kvasir.router.metrics import RouterMetrics
from kvasir.router.replica import Replica

logger = logging.getLogger(__name__)


class HealthChecker:
    def __init__(
        self,
        fleet: Fleet,
        metrics: RouterMetrics,
        client: httpx.AsyncClient,
        api_key: str | None = None,
    ) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.client = client
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._last_canary: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self.on_change = None  # callback(replica) when health flips (etcd sharing)
        self.before_round = None  # async callback before each round (DNS discovery)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking
                logger.exception("health check round failed")
            await asyncio.sleep(self.fleet.cfg.health_interval_s)

    async def check_all(self) -> None:
        if self.before_round is not None:
            await self.before_round()
        reps = list(self.fleet.replicas.values())
        await asyncio.gather(*(self.check(r) for r in reps))
        self.fleet.update_gauges()

    async def check(self, r: Replica) -> bool:
        if r.ejected:
            return False  # still backing off: no probe until the back-off ends
        cfg = self.fleet.cfg
        was = r.healthy
        ok, draining, why = await self._probe(r, cfg.health_timeout_s)
        if ok and cfg.canary_interval_s > 0 and not draining:
            now = time.monotonic()
            if now - self._last_canary.get(r.id, 0.0) >= cfg.canary_interval_s or not was:
                self._last_canary[r.id] = now
                ok, why = await self._canary(r, cfg.health_timeout_s * 5)
        r.replica_draining = draining
        if ok:
            if not was:
                logger.info("replica %s is healthy again", r.id)
                r.consecutive_failures = 0
            r.healthy = True
            r.reinstate()
        else:
            r.last_error = why
            r.consecutive_failures += 1
            # Refused connections: the replica is gone, out at once. Slow or failing
            # answers: out after --eject-failures in a row (a busy replica is not dead).
            if was and (
                "ConnectError" in why or r.consecutive_failures >= cfg.eject_consecutive_failures
            ):
                logger.warning("replica %s failed its health check: %s", r.id, why)
                self.metrics.ejections.labels(r.id, "active").inc()
                r.eject(cfg)
                r.healthy = False
            elif not was:
                r.healthy = False
        if was != r.healthy and self.on_change is not None:
            self.on_change(r)
        return ok

    async def _probe(self, r: Replica, timeout: float) -> tuple[bool, bool, str]:
        try:
            resp = await self.client.get(r.url + "/health", timeout=timeout)
            body = resp.json()
        except (httpx.HTTPError, ValueError) as e:
            return False, False, f"/health: {type(e).__name__}"
        if not isinstance(body, dict):
            return False, False, "/health: not a JSON object"
        r.num_running = float(body.get("num_requests_running") or 0.0)
        r.num_waiting = float(body.get("num_requests_waiting") or 0.0)
        r.kv_usage = float(body.get("kv_cache_usage_perc") or 0.0)
        draining = bool(body.get("draining")) or (
            (body.get("error") or {}).get("code") == "server_draining"
        )
        if resp.status_code != 200 and not draining:
            return False, False, f"/health: HTTP {resp.status_code}"
        if not r.models:
            try:
                m = await self.client.get(
                    r.url + "/v1/models", timeout=timeout, headers=self.headers
                )
                r.models = tuple(d["id"] for d in m.json().get("data", []))
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                pass
        return True, draining, ""

    async def _canary(self, r: Replica, timeout: float) -> tuple[bool, str]:
        body = {"prompt": "ping", "max_tokens": 1, "temperature": 0}
        if r.models:
            body["model"] = r.models[0]
        try:
            resp = await self.client.post(
                r.url + "/v1/completions", json=body, timeout=timeout, headers=self.headers
            )
        except httpx.HTTPError as e:
            return False, f"canary: {type(e).__name__}"
        if resp.status_code == 503 and "server_draining" in resp.text:
            return True, ""
        if resp.status_code != 200:
            return False, f"canary: HTTP {resp.status_code}"
        return True, ""
