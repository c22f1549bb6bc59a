"""One real ``kvasir serve`` shared by the ecosystem tests (conformance, lm-eval,
litellm, langchain-openai)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvasir_server import Server, start_kvasir


@pytest.fixture(scope="session")
def kvasir_server() -> Iterator[Server]:
    srv = start_kvasir()
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()
