"""Many requests at once: correct outputs under batching, and client disconnects that
abort their requests in the engine (blocks freed, nothing left running)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
from server_utils import MODEL, ServerProc

PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "def fibonacci(n):",
    "The sky is blue because",
    "My favourite food is",
    "Water boils at",
]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert m is not None, name
    return float(m.group(1))


def test_32_concurrent_requests_match_sequential(server: ServerProc, http) -> None:
    # Reference: each prompt alone (greedy), then all 32 at once (mixed streaming).
    ref = {}
    for p in PROMPTS:
        r = http.post(
            "/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0}
        )
        ref[p] = r.json()["choices"][0]["text"]

    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, str]:
        p = PROMPTS[i % len(PROMPTS)]
        body = {"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0}
        if i % 2:
            text = ""
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        import json

                        text += json.loads(line[6:])["choices"][0]["text"]
            return p, text
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return p, r.json()["choices"][0]["text"]

    async def main() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=300, limits=limits
        ) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for p, text in results:
        assert text == ref[p], (p, text, ref[p])


def test_dropped_streams_are_aborted(server: ServerProc, http) -> None:
    """100 requests dropped early (most streaming, after their first chunk; some not
    streaming, before any answer): nothing keeps running and a new request is served."""

    async def drop(c: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": f"Story number {i}:",
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
        }
        if i % 4 == 3:  # not streaming: hang up long before the answer
            try:
                await c.post("/v1/completions", json={**body, "stream": False}, timeout=0.05)
            except httpx.TimeoutException:
                pass
            return
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # first chunk seen: hang up

    async def main() -> None:
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=300, limits=limits
        ) as c:
            await asyncio.gather(*(drop(c, i) for i in range(100)))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while True:
        m = httpx.get(server.url + "/metrics").text
        running = _metric(m, "kvasir:num_requests_running")
        waiting = _metric(m, "kvasir:num_requests_waiting")
        if running == 0 and waiting == 0:
            break
        assert time.monotonic() < deadline, (running, waiting)
        time.sleep(0.2)
    assert _metric(m, "kvasir:kv_cache_usage_perc") == 0.0
    t0 = time.monotonic()
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 10
