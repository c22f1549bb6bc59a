"""Start and stop a real ``kvasir serve`` subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
# Small KV cache and context: fast start-up on the CPU.
BASE_ARGS = [
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--max-model-len",
    "2048",
    "--kv-cache-gb",
    "0.1",
    "--disable-uvicorn-access-log",
]
STARTUP_TIMEOUT_S = 300.0


@dataclass
class ServerProc:
    proc: subprocess.Popen
    log_path: Path
    url: str
    core_pid: int
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw) -> httpx.Client:
        kw.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.url, headers=self.headers, **kw)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _reap(self.core_pid)
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Never leave an engine core behind, even if a test failed half-way."""
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def start_server(*extra: str, api_key: str | None = API_KEY) -> ServerProc:
    """Start ``kvasir serve`` and wait until /health answers 200."""
    fd, log_name = tempfile.mkstemp(prefix="kvasir-serve-", suffix=".log")
    log_path = Path(log_name)
    env = dict(os.environ)
    env.pop("KVASIR_API_KEY", None)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-m", "kvasir.entrypoints.cli", "serve", *BASE_ARGS, *extra]
    if api_key:
        args += ["--api-key", api_key]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    url = None
    core_pid = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"kvasir serve exited with {proc.returncode}:\n{log_path.read_text()}"
            )
        text = log_path.read_text(errors="replace")
        if url is None and (m := re.search(r"listening on (http://[\d.]+:\d+)", text)):
            url = m.group(1)
        if core_pid is None and (m := re.search(r"engine core pid (\d+)", text)):
            core_pid = int(m.group(1))
        if url and core_pid:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return ServerProc(proc, log_path, url, core_pid, api_key)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"kvasir serve did not become healthy:\n{log_path.read_text()}")


def wait_for_engine_dead(srv: ServerProc, timeout: float) -> bool:
    """Poll /health until it answers 503 with code "engine_dead" (True), or the server
    stops answering or ``timeout`` seconds pass (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and srv.proc.poll() is None:
        try:
            h = httpx.get(srv.url + "/health", timeout=2)
        except httpx.HTTPError:
            return False
        if h.status_code == 503:
            return h.json()["error"]["code"] == "engine_dead"
        time.sleep(0.02)
    return False


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, list[str]]:
    """POST ``body`` as a streaming completion from a thread, collecting each ``data:``
    payload; returns once the first has arrived (the request is running)."""
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    if not started.wait(120):
        raise RuntimeError("the stream did not start")
    return t, events
