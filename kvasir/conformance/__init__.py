"""An OpenAI-API conformance suite that any server can be pointed at: ``kvasir
conformance --base-url URL`` (a table, or ``--json``) and a pytest plugin
(``pytest -p kvasir.conformance.pytest_plugin --conformance-base-url URL``).

Each case is marked ``core`` (the OpenAI API) or ``extension`` (vLLM's additions)."""

from __future__ import annotations

from kvasir.conformance import cases_core, cases_extension  # noqa: F401  (registers)
from kvasir.conformance.registry import CASES, Case, CaseResult, Ctx
from kvasir.conformance.runner import run_case, run_cases

__all__ = ["CASES", "Case", "CaseResult", "Ctx", "run_case", "run_cases"]
