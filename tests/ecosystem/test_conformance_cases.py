"""The conformance cases can fail: each is run against a loopback server that breaks the
OpenAI contract on purpose (a case that passed here would be one that cannot fail). The
whole suite against a real ``kvasir serve`` is tests/compat/test_conformance_kvasir.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvasir.conformance import CASES, Ctx, run_case
from kvasir.conformance.runner import format_table, select_cases


def test_registry_has_the_cases_the_issue_asks_for() -> None:
    core = [c for c in select_cases() if c.kind == "core"]
    ext = [c for c in select_cases() if c.kind == "extension"]
    assert len(core) >= 30 and len(ext) >= 10
    assert select_cases(["error_*"], "core") == [c for c in core if c.name.startswith("error_")]


# ---- the cases can fail: a server that breaks the contract ----------------------------


class _Broken(BaseHTTPRequestHandler):
    """An OpenAI-looking server with typical bugs: two finish_reasons in a stream, a bare
    string as the error body, 200 for an out-of-range top_p, logprobs > 0, usage that does
    not add up, a completion where a chat completion was asked for."""

    def log_message(self, *a: object) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model",
                   "created": 0, "owned_by": "x"}]}).encode())  # fmt: skip

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if body.get("stream"):
            chunk = {"id": "a", "object": "text_completion",
                     "choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}  # fmt: skip
            data = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for _ in range(2))
            data += b"data: [DONE]\n\n"
            return self._send(200, data, "text/event-stream")
        if body.get("temperature", 0) > 2 or body.get("n") == 0:
            return self._send(400, b'"bad request"')
        lp = {"tokens": ["x"], "token_logprobs": [0.5], "top_logprobs": [{"x": 0.5}],
              "text_offset": [0]}  # fmt: skip
        choice = {"index": 0, "text": "x", "finish_reason": "length", "logprobs": lp}
        total = 7 if body.get("max_tokens") == 5 else 4  # completion_shape's request
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": total}
        self._send(200, json.dumps({"id": "a", "object": "text_completion", "created": 0,
                   "model": "m", "choices": [choice], "usage": usage}).encode())  # fmt: skip


@pytest.fixture
def broken_ctx() -> Iterator[Ctx]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    ctx = Ctx(f"http://127.0.0.1:{httpd.server_address[1]}", None, None, timeout=10)
    yield ctx
    ctx.close()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("completion_stream", "finish_reason count per choice {0: 2}"),
        ("completion_shape", "total_tokens != prompt_tokens + completion_tokens"),
        ("completion_logprobs", "a token logprob > 0"),
        ("error_temperature_range", "no 'error' object"),
        ("error_top_p_range", "expected HTTP 400, got 200"),
        ("chat_shape", "object 'text_completion'"),
    ],
)
def test_cases_fail_on_a_broken_server(broken_ctx: Ctx, name: str, reason: str) -> None:
    result = run_case(CASES[name], broken_ctx)
    assert result.status == "fail" and reason in result.detail, result


def test_table_counts_and_json_shape(broken_ctx: Ctx) -> None:
    results = [
        run_case(CASES[n], broken_ctx) for n in ("models_list", "error_n_zero", "auth_required")
    ]
    assert [r.status for r in results] == ["pass", "fail", "skip"]
    table = format_table(results)
    assert "core: 1 passed, 1 failed, 1 skipped" in table
    assert json.loads(json.dumps({"cases": [r.as_dict() for r in results]}))["cases"][1] == {
        "name": "error_n_zero", "kind": "core", "status": "fail", "detail": results[1].detail,
    }  # fmt: skip
