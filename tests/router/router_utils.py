"""Start and stop ``kvasir router`` subprocesses on free loopback ports."""

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
ADMIN_KEY = "admin-test-key"


@dataclass
class RouterProc:
    proc: subprocess.Popen
    log_path: Path
    url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=900
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_router(*args: str, admin_key: str | None = ADMIN_KEY) -> RouterProc:
    fd, log_name = tempfile.mkstemp(prefix="kvasir-router-", suffix=".log")
    log_path = Path(log_name)
    env = dict(os.environ)
    env.pop("KVASIR_ROUTER_ADMIN_KEY", None)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "kvasir.entrypoints.cli",
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
    ]
    if admin_key:
        cmd += ["--admin-key", admin_key]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"kvasir router exited with {proc.returncode}:\n{log_path.read_text()}"
            )
        m = re.search(r"router listening on (http://[\d.]+:\d+)", log_path.read_text())
        if m:
            return RouterProc(proc, log_path, m.group(1))
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"kvasir router did not start:\n{log_path.read_text()}")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
