"""pytest plugin: one test per conformance case against ``--conformance-base-url``.

``pytest -p kvasir.conformance.pytest_plugin --conformance-base-url URL [--conformance-
api-key K] [--conformance-model M] --pyargs kvasir.conformance.test_conformance_suite``
(or ``-p ...`` in a project whose tests use the ``conformance_ctx`` fixture). A failing
case fails its test; a skipped case skips it with the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvasir.conformance.registry import Ctx
from kvasir.conformance.runner import run_case, select_cases


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("conformance", "OpenAI-API conformance suite")
    g.addoption("--conformance-base-url", default=None, help="server to test")
    g.addoption("--conformance-api-key", default=None)
    g.addoption("--conformance-model", default=None)
    g.addoption("--conformance-kind", default="all", choices=["all", "core", "extension"])


@pytest.fixture(scope="session")
def conformance_ctx(request: pytest.FixtureRequest) -> Iterator[Ctx]:
    url = request.config.getoption("--conformance-base-url")
    if not url:
        pytest.skip("no --conformance-base-url given")
    ctx = Ctx(
        url,
        request.config.getoption("--conformance-api-key"),
        request.config.getoption("--conformance-model"),
    )
    yield ctx
    ctx.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_case" in metafunc.fixturenames:
        kind = metafunc.config.getoption("--conformance-kind")
        cases = select_cases(None, kind)
        metafunc.parametrize("conformance_case", cases, ids=[f"{c.kind}:{c.name}" for c in cases])


def check_case(case, ctx: Ctx) -> None:  # noqa: ANN001
    """Run one case as a test: fail on "fail", skip on "skip"."""
    result = run_case(case, ctx)
    if result.status == "skip":
        pytest.skip(result.detail)
    if result.status == "fail":
        pytest.fail(f"[{result.kind}] {result.name}: {result.detail}", pytrace=False)
