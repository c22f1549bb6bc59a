"""Overload (429 + Retry-After), SIGTERM drain, and a dead engine, each on a server of
its own (the last two end it). Both are started together to overlap model loading."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_utils import (
    MODEL,
    ServerProc,
    pid_alive,
    start_server,
    stream_in_background,
    wait_for_engine_dead,
)


@pytest.fixture(scope="module")
def servers():
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(
            start_server,
            "--max-num-seqs",
            "2",
            "--max-queued-requests",
            "2",
            "--shutdown-timeout",
            "15",
        )
        fb = pool.submit(start_server, api_key=None)
        srvs = {}
        try:
            srvs["limited"] = fa.result()
            srvs["plain"] = fb.result()
            yield srvs
        finally:
            for f in (fa, fb):
                if f.exception() is None:
                    f.result().stop(10)


def _body(max_tokens: int, stream: bool = False, **kw) -> dict:
    return {
        "model": MODEL,
        "prompt": "Tell me a story.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
        **kw,
    }


def test_burst_over_queue_limit_gets_429(servers) -> None:
    srv: ServerProc = servers["limited"]

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str | None, int]:
        stream = i % 2 == 1
        if not stream:
            r = await c.post("/v1/completions", json=_body(8))
            ntok = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            return r.status_code, r.headers.get("retry-after"), ntok
        ntok = 0
        async with c.stream(
            "POST", "/v1/completions", json=_body(8, True, stream_options={"include_usage": True})
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.headers.get("retry-after"), 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    if obj.get("usage"):
                        ntok = obj["usage"]["completion_tokens"]
        return r.status_code, None, ntok

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    results = asyncio.run(main())
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
    for code, retry_after, ntok in results:
        if code == 429:
            assert retry_after is not None and int(retry_after) >= 1
        else:
            assert ntok == 8
    r = httpx.post(srv.url + "/v1/completions", json=_body(4), headers=srv.headers, timeout=60)
    assert r.status_code == 200


def test_sigterm_drains_then_exits_zero(servers) -> None:
    srv: ServerProc = servers["limited"]
    long_events: list[dict] = []
    long_started = threading.Event()
    short_result: dict = {}

    def long_stream() -> None:
        with httpx.stream(
            "POST",
            srv.url + "/v1/completions",
            json=_body(2000, True),
            headers=srv.headers,
            timeout=120,
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    long_events.append(
                        {"done": True} if line == "data: [DONE]" else json.loads(line[6:])
                    )
                    long_started.set()

    t_long = threading.Thread(target=long_stream)
    t_long.start()
    assert long_started.wait(120)

    def short() -> None:
        r = httpx.post(srv.url + "/v1/completions", json=_body(2), headers=srv.headers, timeout=120)
        short_result["status"] = r.status_code
        short_result["body"] = r.json()

    t_short = threading.Thread(target=short)
    t_short.start()
    time.sleep(0.3)  # the short request is in flight
    srv.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    deadline = t0 + 5
    while True:  # /health and new requests turn 503 at once
        h = httpx.get(srv.url + "/health", timeout=5)
        if h.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert h.status_code == 503 and h.json()["error"]["code"] == "server_draining"
    r = httpx.post(srv.url + "/v1/completions", json=_body(2), headers=srv.headers, timeout=10)
    assert r.status_code == 503

    t_short.join(60)
    assert short_result["status"] == 200
    assert short_result["body"]["choices"][0]["finish_reason"] == "length"
    t_long.join(60)
    assert long_events[-1] == {"done": True}
    reasons = [
        c["finish_reason"]
        for e in long_events[:-1]
        for c in e.get("choices", [])
        if c["finish_reason"]
    ]
    assert reasons == ["abort"]

    assert srv.proc.wait(60) == 0
    assert time.monotonic() - t0 >= 14  # it waited for --shutdown-timeout (15 s)
    deadline = time.monotonic() + 10
    while pid_alive(srv.core_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(srv.core_pid), "engine core process left behind"


def test_engine_death_fails_fast_and_exits_nonzero(servers) -> None:
    srv: ServerProc = servers["plain"]
    t, events = stream_in_background(srv.url, _body(2000, True))
    os.kill(srv.core_pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for_engine_dead(srv, 10)
    r = httpx.post(srv.url + "/v1/completions", json=_body(2), timeout=10)
    assert r.status_code == 503
    t.join(30)
    assert time.monotonic() - t0 < 10  # the stream failed fast
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert "error" in err and err["error"]["code"] == "engine_dead"
    assert srv.proc.wait(30) != 0
