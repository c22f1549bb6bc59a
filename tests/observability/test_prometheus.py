"""A real Prometheus (Debian's ``prometheus``) scrapes the real ``kvasir serve`` of
``conftest.py`` under a short load: every PromQL expression of every dashboard panel and
every recording/alert rule is evaluated through Prometheus's HTTP API without error, the
key panels return series, the recorded SLIs exist and the fake GPU's XID fires its alert."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml
from server_utils import API_KEY, MODEL, REPO_ROOT, ServerProc

DEPLOY = REPO_ROOT / "deploy"
# Grafana's variables, as a user with every model/instance/tenant selected would see them.
VARIABLES = {
    "$__rate_interval": "1m",
    "${datasource}": "prometheus",
    "$model": ".*",
    "$instance": ".*",
    "$tenant": ".*",
    "$gpu_hour_usd": "2.5",
}

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs Debian's prometheus (.ci/run installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _substitute(expr: str) -> str:
    for k, v in VARIABLES.items():
        expr = expr.replace(k, v)
    assert "$" not in expr.replace("$1", ""), expr
    return expr


def dashboard_targets() -> list[tuple[str, str, bool]]:
    out = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for p in board["panels"]:
            for t in p.get("targets", []):
                out.append(
                    (f"{path.stem}: {p['title']}", t["expr"], p.get("kvasir_key_panel", False))
                )
    return out


def rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "kvasir.rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def prometheus(obs_server: ServerProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("prometheus")
    # The same rules, evaluated every second (their groups say 30 s / 1 m) so that the
    # recorded series exist within a short test.
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "kvasir.rules.yml").read_text())
    for g in doc["groups"]:
        g.pop("interval", None)
    (d / "rules.yml").write_text(yaml.safe_dump(doc))
    target = obs_server.url.removeprefix("http://")
    (d / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(d / "rules.yml")],
                "scrape_configs": [
                    {"job_name": "kvasir", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    port = _free_port()
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                d / "prometheus.log"
            ).read_text()
            time.sleep(0.3)
        # Scraping before the load starts, so that rate() sees the counters move.
        while not query(url, 'up{job="kvasir"} == 1'):
            assert time.monotonic() < deadline, (d / "prometheus.log").read_text()
            time.sleep(0.3)
        time.sleep(2)
        _load(obs_server)
        # Wait until Prometheus has scraped the finished load, then one more rule round.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = query(url, "sum(kvasir:request_success_total)")
            if got and float(got[0]["value"][1]) >= 6:
                break
            time.sleep(0.5)
        time.sleep(3)  # a few more scrapes and rule rounds
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _load(srv: ServerProc) -> None:
    """Six requests, two at a time, from three tenants (one of them past the label bound)
    plus one 404."""

    def one(i: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}", "x-tenant-id": f"tenant-{i % 3}"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=120) as c:
            if i % 2:
                r = c.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "max_tokens": 3,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": f"Say {i}"}],
                    },
                )
            else:
                r = c.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": f"Number {i} is",
                        "max_tokens": 3,
                        "temperature": 0,
                    },
                )
            assert r.status_code == 200, r.text

    for pair in ((0, 1), (2, 3), (4, 5)):
        ts = [threading.Thread(target=one, args=(i,)) for i in pair]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        # Past a scrape (1 s) before the next pair: a counter series is born with its
        # first request, and rate() only sees the increases after its first sample (a
        # load that fits one scrape interval leaves every ratio at 0/0 = NaN).
        time.sleep(1.5)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404


def query(url: str, expr: str) -> list:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_every_dashboard_expression_evaluates(prometheus: str) -> None:
    targets = dashboard_targets()
    assert len(targets) > 40
    empty_key = []
    for title, expr, key in targets:
        result = query(prometheus, _substitute(expr))
        if key and not result:
            empty_key.append((title, expr))
    assert not empty_key, empty_key


def test_every_rule_evaluates_and_records(prometheus: str) -> None:
    for r in rules():
        query(prometheus, r["expr"])
    # Prometheus itself evaluated every rule without error.
    groups = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"]
    bad = [
        (x["name"], x.get("lastError")) for g in groups for x in g["rules"] if x["health"] == "err"
    ]
    assert not bad, bad
    assert sum(len(g["rules"]) for g in groups) == len(rules())
    # The SLIs are recorded from the load.
    for name in (
        "kvasir:sli_ttft_seconds:p95_5m",
        "kvasir:sli_tpot_seconds:p95_5m",
        "kvasir:sli_availability:ratio_5m",
        "kvasir:slo_ttft_errors:ratio_rate5m",
        "kvasir:ttft_seconds:mean5m",
    ):
        assert query(prometheus, name), name
    (avail,) = query(prometheus, f'kvasir:sli_availability:ratio_5m{{model_name="{MODEL}"}}')
    assert float(avail["value"][1]) == 1.0  # 200s and a 404: no 5xx
    # The generous SLOs of the test server: every request counts as goodput.
    (good,) = query(prometheus, "kvasir:sli_goodput:ratio_5m")
    assert float(good["value"][1]) == 1.0


def test_series_values(prometheus: str) -> None:
    # Tenants: two labels, the third tenant counted as __other__.
    tenants = {
        r["metric"]["tenant"]: float(r["value"][1])
        for r in query(prometheus, "sum by (tenant) (kvasir:tenant_requests_total)")
    }
    assert set(tenants) == {"tenant-0", "tenant-1", "__other__"}
    assert tenants["tenant-0"] == tenants["tenant-1"] == 2
    # tenant-2's two requests and the 404 (no header: its API key's digest) are past
    # the bound of two labels.
    assert tenants["__other__"] == 3
    (nf,) = query(prometheus, 'kvasir:tenant_requests_total{tenant="__other__",status="404"}')
    assert float(nf["value"][1]) == 1
    (tok,) = query(prometheus, 'sum(kvasir:tenant_generation_tokens_total{tenant="tenant-0"})')
    assert float(tok["value"][1]) == 2 * 3  # max_tokens 3 each
    # GPUs from the fake NVML, joined by uuid.
    (sm,) = query(
        prometheus, 'kvasir:gpu_utilization_ratio{uuid="GPU-11111111-2222-3333-4444-555555555555"}'
    )
    assert float(sm["value"][1]) == 0.87
    (power,) = query(prometheus, 'kvasir:gpu_power_watts{gpu="1"}')
    assert float(power["value"][1]) == 80.0
    assert query(
        prometheus, 'kvasir:gpu_throttle_reason{gpu="0",reason="hw_thermal_slowdown"} == 1'
    )
    assert not query(prometheus, 'kvasir:gpu_ecc_errors_total{gpu="1"}')  # not supported there
    alerts = httpx.get(prometheus + "/api/v1/alerts").json()["data"]["alerts"]
    xid = [a for a in alerts if a["labels"]["alertname"] == "KvasirGpuXid"]
    assert xid and xid[0]["labels"]["xid"] == "79" and xid[0]["state"] == "firing"
    assert not [a for a in alerts if a["labels"]["alertname"] == "KvasirEngineDown"]
