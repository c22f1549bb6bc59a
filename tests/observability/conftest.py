"""One real ``kvasir serve`` for the observability tests, with everything on: traces to a
local OTLP/HTTP receiver, tenant metrics, sampled KV-block residency, and GPU metrics
from the fake NVML module (``fake_nvml/pynvml.py`` first on its PYTHONPATH; one XID 79
event). A real Prometheus scrapes it in ``test_prometheus.py``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "server"))
sys.path.insert(0, str(HERE))

from otlp_receiver import HttpReceiver  # noqa: E402
from server_utils import ServerProc, start_server  # noqa: E402

FAKE_NVML_DIR = HERE / "fake_nvml"
TENANT_HEADER = "x-tenant-id"


@pytest.fixture(scope="session")
def otlp_http() -> Iterator[HttpReceiver]:
    rx = HttpReceiver()
    yield rx
    rx.close()


@pytest.fixture(scope="session")
def obs_server(otlp_http: HttpReceiver) -> Iterator[ServerProc]:
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "FAKE_NVML_XIDS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(FAKE_NVML_DIR), saved["PYTHONPATH"]) if x
    )
    os.environ["FAKE_NVML_XIDS"] = "79"
    try:
        srv = start_server(
            "--otlp-traces-endpoint",
            otlp_http.url,
            "--otlp-traces-protocol",
            "http/protobuf",
            "--otlp-service-name",
            "kvasir-test",
            "--enable-tenant-metrics",
            "--max-tenant-labels",
            "2",
            "--kv-cache-metrics",
            "--kv-cache-metrics-sample",
            "0.5",
            "--gpu-metrics-interval",
            "0.5",
            "--slo-ttft-ms",
            "60000",
            "--slo-tpot-ms",
            "60000",
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log()
