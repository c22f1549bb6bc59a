"""``kvasir conformance`` against a real ``kvasir serve``: the command's table and its JSON
last line, the pytest plugin, and the case functions against servers that break the
contract on purpose (so that a case that cannot fail would be caught)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kvasir_server import API_KEY, REPO_ROOT, Server, subprocess_env

from kvasir.conformance import CASES

# Cases kvasir fails today, each with the reason; the test fails on any other failure
# (and tells when one of these starts passing, through the table it prints).
KNOWN_FAILURES = {
    "models_retrieve": "GET /v1/models/{id} is not routed",
    "chat_response_format_json_object": "structured outputs: the API issue",
    "chat_tools": "tool calling: the API issue",
    "error_temperature_range": "temperature is not bounded by OpenAI's [0, 2]",
    "ext_prompt_logprobs": "prompt_logprobs are computed but not returned in the choice",
}


@pytest.mark.timeout(1800)
def test_conformance_command_json_against_kvasir(kvasir_server: Server) -> None:
    args = [sys.executable, "-m", "kvasir.entrypoints.cli", "conformance", "--base-url",
            kvasir_server.url, "--api-key", API_KEY, "--json"]  # fmt: skip
    proc = subprocess.run(
        args, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert list(report) == ["cases"]
    cases = report["cases"]
    for c in cases:
        assert list(c) == ["name", "kind", "status", "detail"], c
        assert c["kind"] in ("core", "extension") and c["status"] in ("pass", "fail", "skip")
    names = [c["name"] for c in cases]
    assert names == list(CASES) and len(set(names)) == len(names)
    assert sum(c["kind"] == "core" for c in cases) >= 30
    assert sum(c["kind"] == "extension" for c in cases) >= 10
    failed = {c["name"]: c["detail"] for c in cases if c["status"] == "fail"}
    unexpected = {k: v for k, v in failed.items() if k not in KNOWN_FAILURES}
    assert not unexpected, "\n".join(lines[:-1])
    # with the key given, nothing is skipped against kvasir
    assert [c["name"] for c in cases if c["status"] == "skip"] == []
    # the table: one row per case, then the totals; exit code 1 because of failures
    for name in names:
        assert any(line.startswith(name + " ") for line in lines), name
    core_pass = sum(c["kind"] == "core" and c["status"] == "pass" for c in cases)
    assert f"core: {core_pass} passed" in proc.stdout
    assert proc.returncode == (1 if failed else 0)


@pytest.mark.timeout(1200)
def test_conformance_pytest_plugin(kvasir_server: Server) -> None:
    args = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "-p", "kvasir.conformance.pytest_plugin",
        "--pyargs", "kvasir.conformance.test_conformance_suite",
        "--conformance-base-url", kvasir_server.url + "/v1",
        "-k", "chat_shape or error_n_zero or auth_required or models_retrieve",
    ]  # fmt: skip
    without_key = subprocess.run(
        args, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    # no key: every case gets 401 but auth_required, which skips
    assert "3 failed" in without_key.stdout and "1 skipped" in without_key.stdout, (
        without_key.stdout
    )
    with_key = subprocess.run(
        [*args, "--conformance-api-key", API_KEY], cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = with_key.stdout
    # models_retrieve is a known failure (GET /v1/models/{id} is not routed)
    assert "3 passed" in out and "1 failed" in out and "core:models_retrieve" in out, out
