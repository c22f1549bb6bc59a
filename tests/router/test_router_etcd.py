"""Two routers sharing a real etcd (Debian's ``etcd-server``): cordons, drains and the
config agree within a second, and a restarted router loses none of them."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx
import pytest
from router_utils import RouterProc, start_router

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="needs etcd (apt-get install etcd-server)")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    client, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
    data = tmp_path_factory.mktemp("etcd")
    proc = subprocess.Popen(
        [ETCD, "--name", "kvasir-test", "--data-dir", str(data),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"kvasir-test=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).json().get("health") == "true":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("etcd did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _router(etcd: str, replicas: list[str]) -> RouterProc:
    flags = []
    for i, u in enumerate(replicas):
        flags += ["--replica", f"r{i}={u}"]
    return start_router(*flags, "--etcd", etcd, "--health-interval", "5", "--canary-interval", "0")


def _state(r: RouterProc) -> dict[str, dict]:
    with r.admin() as c:
        return {x["id"]: x for x in c.get("/admin/replicas").json()["replicas"]}


def _wait(pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("not within the timeout")


def test_two_routers_agree_and_restart_keeps_cordons(etcd):
    # Replica URLs need not answer for the control plane to agree.
    urls = [f"http://127.0.0.1:{_free_port()}" for _ in range(3)]
    a, b = _router(etcd, urls), _router(etcd, urls)
    try:
        with a.admin() as c:
            assert c.post("/admin/replicas/r1/cordon").status_code == 200
        assert _wait(lambda: _state(b)["r1"]["cordoned"], 1.0) < 1.0
        with b.admin() as c:
            assert c.post("/admin/replicas/r2/drain").json()["draining"]
        _wait(lambda: _state(a)["r2"]["draining"] and _state(a)["r2"]["cordoned"], 1.0)
        with b.admin() as c:
            c.post("/admin/replicas/r2/uncordon")
        _wait(lambda: not _state(a)["r2"]["cordoned"] and not _state(a)["r2"]["draining"], 1.0)
        # Weights: a config posted to one router reaches the other.
        cfg = (
            'policy = "power_of_two"\n'
            + "".join(
                f'[[replicas]]\nid = "r{i}"\nurl = "{u}"\nversion = "v{i % 2}"\n'
                for i, u in enumerate(urls)
            )  # fmt: skip
            + '[models."chat"]\nversions = { v0 = 70, v1 = 30 }\n'
        )
        with a.admin() as c:
            assert c.post("/admin/config", content=cfg).status_code == 200
        with b.admin() as c:
            _wait(lambda: c.get("/admin/config").text == cfg, 1.0)
        # A restarted router gets the cordon (and config) back from etcd.
        assert b.stop() == 0
        b = _router(etcd, urls)
        st = _state(b)
        assert st["r1"]["cordoned"] and not st["r0"]["cordoned"] and not st["r2"]["cordoned"]
        with b.admin() as c:
            assert c.get("/admin/config").text == cfg
            assert c.get("/admin/replicas").json()["policy"] == "power_of_two"
    finally:
        a.stop()
        b.stop()
