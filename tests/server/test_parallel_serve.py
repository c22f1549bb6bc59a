"""``kvasir serve --tensor-parallel-size 3`` on the default model (3 worker processes):
it serves, and when a worker is killed mid-stream the server fails the stream at once,
turns /health to 503 and exits non-zero, leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
from server_utils import (
    MODEL,
    pid_alive,
    start_server,
    stream_in_background,
    wait_for_engine_dead,
)


def _body(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def test_tp3_serves_and_a_dead_worker_fails_fast() -> None:
    srv = start_server("--tensor-parallel-size", "3", "--distributed-timeout", "20", api_key=None)
    try:
        workers = [
            p
            for p in psutil.Process(srv.core_pid).children()
            if "kvasir.executor.worker" in " ".join(p.cmdline())
        ]
        assert len(workers) == 3
        r = httpx.post(srv.url + "/v1/completions", json=_body(8), timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

        t, events = stream_in_background(srv.url, _body(1500, True))
        os.kill(workers[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_for_engine_dead(srv, 20)
        t.join(30)
        assert time.monotonic() - t0 < 20  # well inside the distributed timeout
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert srv.proc.wait(30) != 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(w.pid) for w in workers):
            time.sleep(0.1)
        assert not any(pid_alive(w.pid) for w in workers), "a worker outlived the server"
    finally:
        srv.stop()
