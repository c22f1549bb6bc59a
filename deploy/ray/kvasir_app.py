"""A Ray Serve application of kvasir replicas.

Each Serve replica runs one ``kvasir serve`` (its engine may span several GPUs through
``--distributed-executor-backend ray --tensor-parallel-size N``) and passes the
OpenAI API through, streaming included; Ray Serve places the replicas, health-checks
them (``check_health`` -> the server's ``/health``) and autoscales them on the number of
ongoing requests.

    serve run --app-dir deploy/ray kvasir_app:build_app args="--max-model-len 4096" num_gpus=1

or from Python: ``serve.run(build_app({"args": "...", "num_gpus": 1}))``. Put
``kvasir router`` in front of several applications (or clusters) for cache-aware routing.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

_HOP = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@serve.deployment(
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 30,
        "downscale_delay_s": 300,
    },
    max_ongoing_requests=64,
    health_check_period_s=5,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=35,
)
class KvasirReplica:
    def __init__(self, args: list[str], startup_timeout_s: float = 600.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kvasir.entrypoints.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=dict(os.environ))
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvasir serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            self.proc.kill()
            raise RuntimeError("kvasir serve did not become healthy")
        self.client = httpx.AsyncClient(base_url=self.url, timeout=None)

    def replica_url(self) -> str:
        """The replica's own kvasir server (for tests and debugging)."""
        return self.url

    async def check_health(self) -> None:
        r = await self.client.get("/health", timeout=5)
        if r.status_code != 200:
            raise RuntimeError(f"kvasir serve /health: {r.status_code} {r.text[:200]}")

    async def __call__(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        req = self.client.build_request(
            request.method, request.url.path, params=request.query_params,
            headers=headers, content=await request.body(),
        )  # fmt: skip
        resp = await self.client.send(req, stream=True)
        out_headers = {
            k: v for k, v in resp.headers.items() if k.lower() not in _HOP | {"content-encoding"}
        }
        if resp.headers.get("content-type", "").startswith("text/event-stream"):

            async def body() -> Any:
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:
                    await resp.aclose()

            return StreamingResponse(body(), resp.status_code, out_headers)
        content = await resp.aread()
        await resp.aclose()
        return Response(content, resp.status_code, out_headers)

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: kvasir serve drains, then exits
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()


def build_app(config: dict[str, Any]) -> Any:
    """``config``: ``args`` (kvasir serve flags, a string or a list), ``num_gpus`` per
    replica (tensor parallel size x pipeline stages), ``num_cpus``, and optionally
    ``min_replicas``/``max_replicas``."""
    args = config.get("args", [])
    if isinstance(args, str):
        args = shlex.split(args)
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_gpus": float(config.get("num_gpus", 1)),
            "num_cpus": float(config.get("num_cpus", 1)),
        }
    }
    if "min_replicas" in config or "max_replicas" in config:
        auto = dict(KvasirReplica._deployment_config.autoscaling_config.dict())
        auto.update({k: int(config[k]) for k in ("min_replicas", "max_replicas") if k in config})
        options["autoscaling_config"] = auto
    return KvasirReplica.options(**options).bind(list(args))


async def _main() -> None:  # pragma: no cover - manual use
    serve.run(build_app({"args": sys.argv[1:], "num_gpus": 0}))
    while True:
        await asyncio.sleep(3600)


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_main())
