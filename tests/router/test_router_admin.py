"""The router without a model: no healthy replica (503 + Retry-After, never a hang),
admin-API bad input, config reload (POST /admin/config and SIGHUP) keeping the old config
on error, and the admin key."""

from __future__ import annotations

import signal
import socket
import time

import httpx
import pytest
from router_utils import ADMIN_KEY, start_router


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    return f"http://127.0.0.1:{port}"


CONFIG = """\
policy = "least_outstanding"
max_retries = 1

[[replicas]]
id = "one"
url = "{a}"

[[replicas]]
id = "two"
url = "{b}"
"""


@pytest.fixture
def router(tmp_path):
    path = tmp_path / "router.toml"
    path.write_text(CONFIG.format(a=_dead_url(), b=_dead_url()))
    r = start_router("--config", str(path), "--health-interval", "0.2", "--eject-base", "0.2")
    r.config_path = path
    try:
        yield r
    finally:
        assert r.stop() == 0, r.log()


def test_no_healthy_replica_is_503_with_retry_after(router):
    t0 = time.monotonic()
    for body in ({"prompt": "hi", "max_tokens": 2}, {"prompt": "hi", "stream": True}):
        r = httpx.post(router.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] in ("no_healthy_replica", "replicas_failed")
    assert time.monotonic() - t0 < 10
    h = httpx.get(router.url + "/health")
    assert h.status_code == 503 and h.headers["retry-after"] == "1"
    m = httpx.get(router.url + "/metrics").text
    assert 'kvasir_router:replica_healthy{replica="one"} 0.0' in m


def test_admin_bad_input(router):
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(router.url + "/admin/replicas").status_code == 401
    assert (
        httpx.get(router.url + "/admin/replicas", headers={"x-admin-key": "wrong"}).status_code
        == 401
    )
    r = httpx.post(router.url + "/admin/replicas/three/cordon", headers=auth)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "replica_not_found" and "three" in err["message"]
    r = httpx.post(router.url + "/admin/replicas/one/drain", params={"wait": "soon"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "wait"
    r = httpx.post(router.url + "/admin/replicas/one/cordon", headers=auth)
    assert r.status_code == 200 and r.json()["cordoned"] is True


def test_config_reload_refuses_bad_config_and_keeps_old(router):
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    old = httpx.get(router.url + "/admin/config", headers=auth).text
    bad = old.replace('policy = "least_outstanding"', 'policy = "least_outstanding')
    r = httpx.post(router.url + "/admin/config", content=bad, headers=auth)
    assert r.status_code == 400
    assert "line 1" in r.json()["error"]["message"] and r.json()["error"]["param"] == "line 1"
    bad = old + '\n[[replicas]]\nid = "three"\nurl = "gopher://x"\n'
    r = httpx.post(router.url + "/admin/config", content=bad, headers=auth)
    assert r.status_code == 400 and "line 14" in r.json()["error"]["message"], r.text
    assert httpx.get(router.url + "/admin/config", headers=auth).text == old
    reps = httpx.get(router.url + "/admin/replicas", headers=auth).json()
    assert [x["id"] for x in reps["replicas"]] == ["one", "two"]
    assert reps["policy"] == "least_outstanding"
    # A good one is taken: a third replica, another policy; the cordon on "one" stays.
    httpx.post(router.url + "/admin/replicas/one/cordon", headers=auth)
    good = old.replace("least_outstanding", "power_of_two") + (
        f'\n[[replicas]]\nid = "three"\nurl = "{_dead_url()}"\n'
    )
    r = httpx.post(router.url + "/admin/config", content=good, headers=auth)
    assert r.status_code == 200 and r.json()["replicas"] == ["one", "three", "two"]
    reps = httpx.get(router.url + "/admin/replicas", headers=auth).json()
    assert reps["policy"] == "power_of_two"
    assert {x["id"]: x["cordoned"] for x in reps["replicas"]} == {
        "one": True, "two": False, "three": False}  # fmt: skip
    # SIGHUP re-reads the file: a bad file is refused (logged), the live config kept.
    router.config_path.write_text("policy = [\n")
    router.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config reload refused" not in router.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "config reload refused" in router.log() and "line 1" in router.log()
    reps = httpx.get(router.url + "/admin/replicas", headers=auth).json()
    assert reps["policy"] == "power_of_two" and len(reps["replicas"]) == 3
    # A good file through SIGHUP is applied.
    router.config_path.write_text(CONFIG.format(a=_dead_url(), b=_dead_url()).replace(
        "least_outstanding", "round_robin"))  # fmt: skip
    router.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reps = httpx.get(router.url + "/admin/replicas", headers=auth).json()
        if reps["policy"] == "round_robin":
            break
        time.sleep(0.05)
    assert reps["policy"] == "round_robin" and len(reps["replicas"]) == 2


def test_admin_api_off_without_key():
    r = start_router("--replica", _dead_url(), admin_key=None)
    try:
        resp = httpx.get(r.url + "/admin/replicas")
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "admin_disabled"
    finally:
        r.stop()


def test_malformed_config_file_refused_at_start(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        'policy = "round_robin"\n[[replicas]]\nurl = "http://127.0.0.1:1"\nweight = 3\n'
    )
    with pytest.raises(RuntimeError, match=r"line 2: replicas\[0\]: unknown key"):
        start_router("--config", str(path))


def test_replica_dns_discovery():
    """--replica-dns HOST:PORT: every address of HOST is a replica (a headless Service)."""
    url = _dead_url()
    port = url.rsplit(":", 1)[1]
    r = start_router("--replica-dns", f"localhost:{port}", "--health-interval", "0.2")
    try:
        with r.admin() as c:
            reps = c.get("/admin/replicas").json()["replicas"]
        by_url = {x["url"]: x for x in reps}
        assert f"http://127.0.0.1:{port}" in by_url
        assert by_url[f"http://127.0.0.1:{port}"]["id"] == "localhost-127.0.0.1"
    finally:
        r.stop()
    with pytest.raises(RuntimeError, match="expected HOST:PORT"):
        start_router("--replica-dns", "localhost")
