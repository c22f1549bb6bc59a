"""Keys and the tenants file of the security tests (a module of its own: ``conftest``
is not importable by name once several test directories have one)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_utils import MODEL  # noqa: E402

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
