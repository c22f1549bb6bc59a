"""OpenAI error objects and the exception handlers that make every failure one.

A client's mistake is a 4xx naming the offending parameter, never a 500: FastAPI's
validation errors, malformed JSON and ``ValueError`` from input processing all become
400s here.
"""

from __future__ import annotations

import logging
import re

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

_PARAM_RE = re.compile(r"^'?([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?)'?\b")


class OpenAIError(Exception):
    """Raise anywhere in a handler to answer with an OpenAI error object."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self) -> Response:
        return Response(
            msgspec.json.encode(self.to_dict()),
            status_code=self.status_code,
            headers=self.headers,
            media_type="application/json",
        )


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def from_value_error(
    e: ValueError, known_params: set[str], rename: dict[str, str] | None = None
) -> OpenAIError:
    """A ``ValueError`` from ``SamplingParams`` / ``InputProcessor`` (whose messages
    start with the parameter name) as a 400 naming that parameter."""
    msg = str(e)
    param = getattr(e, "param", None)
    if param is None:
        m = _PARAM_RE.match(msg)
        if m is not None:
            base = m.group(1).split("[")[0]
            if base in known_params:
                param = m.group(1)
    if param is not None and rename:
        base, sep, rest = param.partition("[")
        param = rename.get(base, base) + sep + rest
    return bad_request(msg, param)


# Names pydantic puts in ``loc`` for the branch of a union it tried: not parameters.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "nullable"}


def _loc_to_param(loc: tuple) -> str | None:
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or str(p).startswith("function-") or str(p) in _UNION_TAGS:
            continue
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    etype = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if etype == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(
            f"malformed JSON body: {ctx.get('error', first.get('msg'))}", None, "invalid_json"
        )
    param = _loc_to_param(loc)
    if param is None:
        if etype == "missing":
            return bad_request("request body is required (a JSON object)", None, "invalid_body")
        return bad_request("request body must be a JSON object", None, "invalid_body")
    if etype == "missing":
        return bad_request(
            f"missing required parameter: {param!r}", param, "missing_required_parameter"
        )
    return bad_request(f"{param}: {first.get('msg', 'invalid value')}", param)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error"
        )
        return OpenAIError(
            exc.status_code, str(exc.detail), kind, None, {404: "not_found"}.get(exc.status_code)
        ).to_response()

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> Response:
        # Handlers convert their own ValueErrors with the right parameter names; one
        # that slips through is still the client's input, not a server fault.
        return bad_request(str(exc)).to_response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Response:
        logger.exception("internal error")
        return OpenAIError(
            500,
            f"internal server error: {type(exc).__name__}",
            "internal_server_error",
            None,
            "internal_error",
        ).to_response()
