"""A real ``kvasir serve`` with ``--api-keys-file`` for the tenant and fuzzing tests."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# server_utils (start_server, ServerProc) lives beside the server tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from security_utils import ADMIN_KEY, tenants_file  # noqa: E402
from server_utils import MODEL, ServerProc, start_server  # noqa: E402


@pytest.fixture(scope="session")
def keys_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tenants") / "keys.json"
    p.write_text(json.dumps(tenants_file()))
    return p


GUARDS = {
    "input": {"injection": {"action": "block"}},
    "output": {
        "pii": {"action": "redact"},
        "blocklist": {"action": "redact", "words": ["zorblax"]},
    },
}


@pytest.fixture(scope="session")
def tenant_server(keys_path: Path) -> Iterator[ServerProc]:
    guards = keys_path.parent / "guards.json"
    guards.write_text(json.dumps(GUARDS))
    srv = start_server(
        "--api-keys-file", str(keys_path), "--logprobs-precision", "2",
        "--guard-config", str(guards), api_key=ADMIN_KEY,
    )  # fmt: skip
    try:
        # Warm up (the first request of a fresh server is the slowest): the rate tests
        # then measure their own requests, not start-up.
        httpx.post(
            srv.url + "/v1/completions",
            json={"model": MODEL, "prompt": "warm up", "max_tokens": 4},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=300,
        ).raise_for_status()
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log()


@pytest.fixture(scope="session")
def openapi_schema(tenant_server: ServerProc):  # noqa: ANN201
    import schemathesis

    return schemathesis.openapi.from_url(tenant_server.url + "/openapi.json")
