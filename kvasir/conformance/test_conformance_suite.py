"""The suite as pytest tests (collected with ``--pyargs`` and the plugin)."""

from __future__ import annotations

from kvasir.conformance.pytest_plugin import check_case
from kvasir.conformance.registry import Case, Ctx


def test_conformance(conformance_case: Case, conformance_ctx: Ctx) -> None:
    check_case(conformance_case, conformance_ctx)
