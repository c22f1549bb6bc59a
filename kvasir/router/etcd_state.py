"""Router state shared through etcd (``--etcd URL``): cordons, drains, ejections and the
config (weights) live under one key prefix, so several routers act as one and a
restarted router gets them back. Talks to etcd's v3 JSON gateway (``/v3/kv/*``,
``/v3/watch``) with httpx, so no gRPC stubs are needed.

Keys (under ``--etcd-prefix``, default ``/kvasir/router``)::

    cordon/<replica id>   "1" while cordoned
    drain/<replica id>    "1" while draining
    eject/<replica id>    {"until": <unix time>} after an ejection
    config                the TOML text of the last POST /admin/config
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable

import httpx

logger = logging.getLogger(__name__)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _range_end(prefix: str) -> str:
    """The key just past every key starting with ``prefix`` (etcd's prefix range)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return base64.b64encode(bytes(b)).decode()


class EtcdState:
    def __init__(
        self,
        url: str,
        prefix: str,
        apply: Callable[[str, str | None], None],
        timeout: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.prefix = prefix.rstrip("/") + "/"
        self.apply = apply  # (key below the prefix, value or None when deleted)
        self.client = httpx.AsyncClient(timeout=timeout)
        self._task: asyncio.Task | None = None
        self.revision = 0

    async def start(self) -> None:
        """Load every key (the state a restarted router must not lose), then watch."""
        r = await self.client.post(
            self.url + "/v3/kv/range",
            json={"key": _b64(self.prefix), "range_end": _range_end(self.prefix)},
        )
        r.raise_for_status()
        body = r.json()
        self.revision = int(body.get("header", {}).get("revision", 0))
        for kv in body.get("kvs", []):
            self.apply(_unb64(kv["key"])[len(self.prefix) :], _unb64(kv.get("value", "")))
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="router-etcd")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.client.aclose()

    async def put(self, key: str, value: str) -> None:
        r = await self.client.post(
            self.url + "/v3/kv/put", json={"key": _b64(self.prefix + key), "value": _b64(value)}
        )
        r.raise_for_status()

    async def delete(self, key: str) -> None:
        r = await self.client.post(
            self.url + "/v3/kv/deleterange", json={"key": _b64(self.prefix + key)}
        )
        r.raise_for_status()

    async def _watch(self) -> None:
        backoff = 0.2
        while True:
            try:
                req = {
                    "create_request": {
                        "key": _b64(self.prefix),
                        "range_end": _range_end(self.prefix),
                        "start_revision": self.revision + 1,
                    }
                }
                async with self.client.stream(
                    "POST", self.url + "/v3/watch", json=req, timeout=None
                ) as resp:
                    backoff = 0.2
                    async for line in resp.aiter_lines():
                        if line.strip():
                            self._on_message(json.loads(line))
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, ValueError) as e:
                logger.warning("etcd watch failed (%s); retrying", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_message(self, msg: dict) -> None:
        result = msg.get("result", {})
        for ev in result.get("events", []):
            kv = ev.get("kv", {})
            key = _unb64(kv["key"])[len(self.prefix) :]
            self.revision = max(self.revision, int(kv.get("mod_revision", 0)))
            if ev.get("type") == "DELETE":
                self.apply(key, None)
            else:
                self.apply(key, _unb64(kv.get("value", "")))
