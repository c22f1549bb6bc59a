"""deploy/ray: the Ray Serve application on a local Ray cluster started by the test.
One Serve replica (a real ``kvasir serve`` of a small dummy-weight model); requests
through Ray Serve's HTTP proxy, streamed and not, equal the replica's own answers."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = REPO_ROOT / "deploy" / "ray"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ARGS = ["--model", "tiny-llama", "--load-format", "dummy", "--max-model-len", "128",
        "--kv-cache-gb", "0.01", "--disable-uvicorn-access-log", "--gpu-metrics-interval", "0"]  # fmt: skip


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def app_url():
    env_path = os.pathsep.join([str(REPO_ROOT), str(APP_DIR), os.environ.get("PYTHONPATH", "")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path  # the Serve replica actors import kvasir_app
    sys.path.insert(0, str(APP_DIR))
    import kvasir_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(
            kvasir_app.build_app({"args": ARGS, "num_gpus": 0, "num_cpus": 0.5}),
            name="kvasir",
            route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}", handle.replica_url.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.path.remove(str(APP_DIR))
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_ray_serve_app_passes_through(app_url):
    url, replica = app_url
    body = {"prompt": [1, 17, 305, 92, 4], "max_tokens": 8, "temperature": 0}
    direct = httpx.post(replica + "/v1/completions", json=body, timeout=120).json()
    via = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert via.status_code == 200, via.text
    via = via.json()
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 8
    ids = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                      "return_token_ids": True}, timeout=120) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        ids += json.loads(e)["choices"][0]["token_ids"]
    assert len(ids) == 8
    h = httpx.get(url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["draining"] is False
    # The replica's 400 comes back through Serve unchanged.
    bad = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 0}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
