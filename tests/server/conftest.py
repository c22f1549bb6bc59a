"""A real ``kvasir serve`` subprocess on a free loopback port, shared by the tests.

The main server (with an API key) is started once per test session and reused by every
module; tests that end a server (drain, engine kill) start their own through
``server_utils.start_server``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_utils import API_KEY, ServerProc, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProc]:
    srv = start_server("--log-requests-json")
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log()


@pytest.fixture
def client(server: ServerProc):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120.0)


@pytest.fixture
def http(server: ServerProc) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def tools_server() -> Iterator[ServerProc]:
    """A server that parses tool calls (Hermes format) and reasoning (``qwen3``),
    shared by the structured-output and tool-calling modules."""
    srv = start_server(
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"
    )
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log()
