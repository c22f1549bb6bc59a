"""schemathesis against the real server's /openapi.json: generated requests for every
operation, with a tenant key and without one, a bounded number of examples each. No
response may be a 5xx, and every 4xx must be an OpenAI error object. (Response-body
schema conformance of the 2xx answers is not checked here.)"""

from __future__ import annotations

import schemathesis
from conftest import KEYS
from hypothesis import HealthCheck, settings

schema = schemathesis.pytest.from_fixture("openapi_schema")


def _check(response) -> None:  # noqa: ANN001
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if 400 <= response.status_code < 500 and response.status_code not in (404, 405):
        body = response.json()
        err = body["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str)
        assert set(err) >= {"message", "type", "param", "code"}
    elif response.status_code in (404, 405):  # routing errors are OpenAI errors too
        assert "error" in response.json()


@schema.parametrize()
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_fuzz_with_a_tenant_key_and_without(case) -> None:  # noqa: ANN001
    if case.path.startswith("/admin/drain") or case.path.startswith("/admin/undrain"):
        # A tenant key gets 403 there; without a key 401: still exercised below.
        pass
    for headers in ({"Authorization": f"Bearer {KEYS['acme']}"}, {}):
        _check(case.call(headers=headers, timeout=120))
