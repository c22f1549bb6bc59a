"""Run conformance cases against a server; ``kvasir conformance``'s table and JSON."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
import traceback

import httpx

from kvasir.conformance.registry import CASES, Case, CaseFailed, CaseResult, CaseSkipped, Ctx

logger = logging.getLogger(__name__)


def run_case(c: Case, ctx: Ctx) -> CaseResult:
    """One case's result: pass (with its detail line), fail (the assertion or the error)
    or skip (the reason). Never raises."""
    try:
        detail = c.fn(ctx)
        return CaseResult(c.name, c.kind, "pass", detail or "")
    except CaseSkipped as e:
        return CaseResult(c.name, c.kind, "skip", str(e))
    except (CaseFailed, AssertionError) as e:
        return CaseResult(c.name, c.kind, "fail", str(e) or "assertion failed")
    except httpx.HTTPError as e:
        return CaseResult(c.name, c.kind, "fail", f"{type(e).__name__}: {e}")
    except Exception as e:  # a malformed body (KeyError, TypeError, JSON): a failure too
        where = traceback.extract_tb(e.__traceback__)[-1]
        return CaseResult(c.name, c.kind, "fail", f"{type(e).__name__}: {e} (line {where.lineno})")


def select_cases(patterns: list[str] | None = None, kind: str | None = None) -> list[Case]:
    import kvasir.conformance  # noqa: F401  (registers the cases)

    out = [c for c in CASES.values() if kind in (None, "all", c.kind)]
    if patterns:
        out = [c for c in out if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    return out


def run_cases(
    base_url: str,
    api_key: str | None = None,
    model: str | None = None,
    patterns: list[str] | None = None,
    kind: str | None = None,
    timeout: float = 120.0,
) -> list[CaseResult]:
    ctx = Ctx(base_url, api_key, model, timeout=timeout)
    try:
        return [run_case(c, ctx) for c in select_cases(patterns, kind)]
    finally:
        ctx.close()


def format_table(results: list[CaseResult], width: int = 70) -> str:
    name_w = max([len(r.name) for r in results] + [4])
    lines = [f"{'case':<{name_w}}  {'kind':<9}  {'status':<6}  detail"]
    lines.append("-" * len(lines[0]))
    for r in results:
        detail = r.detail.replace("\n", " ")
        if len(detail) > width:
            detail = detail[: width - 3] + "..."
        lines.append(f"{r.name:<{name_w}}  {r.kind:<9}  {r.status:<6}  {detail}")
    lines.append("")
    for kind in ("core", "extension"):
        rs = [r for r in results if r.kind == kind]
        counts = {s: sum(r.status == s for r in rs) for s in ("pass", "fail", "skip")}
        lines.append(
            f"{kind}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
        )
    return "\n".join(lines)


def add_cli_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="bearer token (also enables the auth case)")
    p.add_argument(
        "--model", default=None, help="model id to request (default: the first of /v1/models)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument(
        "-k",
        "--case",
        action="append",
        default=None,
        metavar="GLOB",
        help="run only cases whose name matches (repeatable)",
    )
    p.add_argument("--kind", choices=["all", "core", "extension"], default="all")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def main(args: argparse.Namespace) -> int:
    """Exit 0 when no case failed, 1 otherwise."""
    if args.list:
        for c in select_cases(args.case, args.kind):
            print(f"{c.name:<40} {c.kind:<9} {c.doc}")
        return 0
    results = run_cases(args.base_url, args.api_key, args.model, args.case, args.kind, args.timeout)
    print(format_table(results))
    if args.json:
        print(json.dumps({"cases": [r.as_dict() for r in results]}))
    sys.stdout.flush()
    return 1 if any(r.status == "fail" for r in results) else 0


def add_conformance_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformance", help="OpenAI-API conformance suite against any server (--base-url)"
    )
    add_cli_args(p)
    p.set_defaults(func=main)
