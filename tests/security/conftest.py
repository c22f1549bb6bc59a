"""A real ``kvasir serve`` with ``--api-keys-file`` for the tenant and fuzzing tests."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# server_utils (start_server, ServerProc) lives beside the server tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_utils import MODEL, ServerProc, start_server  # noqa: E402

ADMIN_KEY = "sk-operator-admin-7f3a"
KEYS = {
    "acme": "sk-acme-3b9d0c1e",
    "beta": "sk-beta-5e8f2a7c",
    "gamma": "sk-gamma-1d4c9b2e",
    "delta": "sk-delta-8a6e3f0d",
    "ops": "sk-ops-2c7b5d9a",
}


def tenants_file(extra: list[dict] | None = None) -> dict:
    return {
        "tenants": [
            {
                "name": "acme",
                "keys": [KEYS["acme"]],
                "limits": {
                    "max_concurrent_requests": 2,
                    "max_tokens": 16,
                    "max_n": 2,
                    "max_logprobs": 2,
                    "allowed_models": [MODEL],
                },
            },
            {
                # Given as a hash: the file never holds this key.
                "name": "beta",
                "keys": ["sha256:" + hashlib.sha256(KEYS["beta"].encode()).hexdigest()],
                "limits": {"tokens_per_minute": 60},
            },
            {"name": "gamma", "keys": [KEYS["gamma"]], "shared_prefix": True},
            {
                "name": "delta",
                "keys": [KEYS["delta"]],
                "shared_prefix": True,
                "limits": {"allowed_models": ["some-other-model"]},
            },
            {"name": "ops", "keys": [KEYS["ops"]], "admin": True},
            *(extra or []),
        ]
    }


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
