"""A real ``kvasir serve`` subprocess (the default SmolLM2 model) on a free loopback
port, for the ecosystem tests: the conformance suite, lm-eval and the real clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "eco-key"
SERVE_ARGS = (
    "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048", "--kv-cache-gb", "0.1",
    "--disable-uvicorn-access-log",
)  # fmt: skip


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("KVASIR_API_KEY", None)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path
    api_key: str | None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_kvasir(*extra: str, api_key: str | None = API_KEY, timeout: float = 300) -> Server:
    """Start ``kvasir serve`` and wait for /health to answer 200."""
    fd, log_name = tempfile.mkstemp(prefix="kvasir-eco-", suffix=".log")
    args = [sys.executable, "-m", "kvasir.entrypoints.cli", "serve", *SERVE_ARGS, *extra]
    if api_key:
        args += ["--api-key", api_key]
    proc = subprocess.Popen(
        args, cwd=REPO_ROOT, env=subprocess_env(), stdout=fd, stderr=subprocess.STDOUT
    )
    os.close(fd)
    log_path = Path(log_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"kvasir serve exited with {proc.returncode}:\n{log_path.read_text()}"
            )
        m = re.search(r"listening on (http://[\d.]+:\d+)", log_path.read_text(errors="replace"))
        if m:
            try:
                if httpx.get(m.group(1) + "/health", timeout=5).status_code == 200:
                    return Server(proc, m.group(1), log_path, api_key)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"kvasir serve did not become healthy:\n{log_path.read_text()}")
