"""The conformance cases' registry, the HTTP context a case runs with, and its result.

A case is a function ``fn(ctx) -> str | None`` registered with ``@case(kind)``: it
returns (optionally a detail line) when the server conforms, raises ``CaseFailed``
(or AssertionError) when it does not, and ``CaseSkipped`` when the case does not apply
(no API key configured, say). Cases never share state; each sends its own requests.
``kind`` is ``"core"`` for behaviour of the OpenAI API itself and ``"extension"`` for
vLLM's additions, which kvasir also implements.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

Kind = Literal["core", "extension"]
Status = Literal["pass", "fail", "skip"]


class CaseFailed(AssertionError):
    pass


class CaseSkipped(Exception):
    pass


@dataclass(frozen=True)
class Case:
    name: str
    kind: Kind
    fn: Callable[[Ctx], str | None]
    doc: str


@dataclass(frozen=True)
class CaseResult:
    name: str
    kind: Kind
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "status": self.status, "detail": self.detail}


CASES: dict[str, Case] = {}


def case(kind: Kind) -> Callable[[Callable[[Ctx], str | None]], Callable[[Ctx], str | None]]:
    """Register ``fn`` as a case named after it (without a ``case_`` prefix)."""

    def register(fn: Callable[[Ctx], str | None]) -> Callable[[Ctx], str | None]:
        name = fn.__name__.removeprefix("case_")
        if name in CASES:
            raise ValueError(f"conformance case {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        CASES[name] = Case(name, kind, fn, doc)
        return fn

    return register


def check(cond: object, message: str) -> None:
    """Fail the case with ``message`` unless ``cond`` holds."""
    if not cond:
        raise CaseFailed(message)


@dataclass
class SSE:
    """A streamed response: its status, the JSON events and whether ``[DONE]`` ended it
    (and was the last event)."""

    status: int
    events: list[dict[str, Any]]
    done: bool
    done_last: bool
    content_type: str


class Ctx:
    """What a case gets: an HTTP client on the server's base URL (``/v1`` included or
    not), the API key, and the model id to request."""

    def __init__(
        self, base_url: str, api_key: str | None, model: str | None, timeout: float = 120.0
    ) -> None:
        root = base_url.rstrip("/")
        self.root = root.removesuffix("/v1")
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.root, headers=headers, timeout=timeout)
        self._model = model

    def close(self) -> None:
        self.http.close()

    @property
    def model(self) -> str:
        if self._model is None:
            r = self.http.get("/v1/models")
            if r.status_code != 200 or not r.json().get("data"):
                raise CaseFailed(f"GET /v1/models gave {r.status_code}; pass --model")
            self._model = str(r.json()["data"][0]["id"])
        return self._model

    def post(self, path: str, body: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw)

    def ok(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST and require a 200 JSON object."""
        r = self.post(path, body)
        check(r.status_code == 200, f"POST {path} -> {r.status_code}: {r.text[:300]}")
        data = r.json()
        check(isinstance(data, dict), f"POST {path}: body is not a JSON object")
        return data

    def completion(self, **body: Any) -> dict[str, Any]:
        return self.ok("/v1/completions", {"model": self.model, **body})

    def chat(self, **body: Any) -> dict[str, Any]:
        return self.ok("/v1/chat/completions", {"model": self.model, **body})

    def stream(self, path: str, body: dict[str, Any]) -> SSE:
        """POST with ``stream: true`` and parse the ``data:`` lines of the SSE body."""
        events: list[dict[str, Any]] = []
        done = done_last = False
        with self.http.stream("POST", path, json={**body, "stream": True}) as r:
            ctype = r.headers.get("content-type", "")
            if r.status_code != 200:
                r.read()
                return SSE(r.status_code, [], False, False, ctype)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    done = done_last = True
                    continue
                done_last = False
                events.append(json.loads(payload))
        return SSE(r.status_code, events, done, done and done_last, ctype)


def expect_error(r: httpx.Response, statuses: tuple[int, ...], param: str | None = None) -> str:
    """The response is an OpenAI error object with one of ``statuses``: ``{"error":
    {"message": str, "type": str, "param": ..., "code": ...}}``; with ``param``, its param
    (or message) names that parameter."""
    check(
        r.status_code in statuses,
        f"expected HTTP {'/'.join(map(str, statuses))}, got {r.status_code}: {r.text[:200]}",
    )
    try:
        body = r.json()
    except ValueError:
        raise CaseFailed(f"error body is not JSON: {r.text[:200]!r}") from None
    err = body.get("error") if isinstance(body, dict) else None
    check(isinstance(err, dict), f"no 'error' object in {str(body)[:200]}")
    assert isinstance(err, dict)
    check(isinstance(err.get("message"), str) and err["message"], "error.message missing")
    check(isinstance(err.get("type"), str), "error.type missing")
    check("param" in err and "code" in err, "error object lacks 'param' or 'code'")
    if param is not None:
        named = err.get("param") == param or param in str(err.get("message"))
        check(named, f"error does not name {param!r}: {err}")
    return f"{r.status_code} {err.get('type')}"
