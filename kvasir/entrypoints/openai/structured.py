"""Structured-output fields of a request -> ``StructuredOutputsParams`` (400s name the
field): OpenAI's ``response_format``, vLLM's ``structured_outputs`` and ``guided_*``."""

from __future__ import annotations

import re
from typing import Any

from kvasir.entrypoints.openai.errors import bad_request
from kvasir.entrypoints.openai.protocol import SamplingFields
from kvasir.sampling_params import StructuredOutputsParams

_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def make_structured_params(kwargs: dict[str, Any], param: str) -> StructuredOutputsParams:
    """``StructuredOutputsParams(**kwargs)``, checked: any error is a 400 naming
    ``param`` (the request field the constraint came from)."""
    from kvasir.structured_output import validate

    try:
        params = StructuredOutputsParams(**kwargs)
        validate(params)
    except TypeError as e:
        raise bad_request(f"{param}: {e}", param) from None
    except ValueError as e:
        msg = re.sub(r"^structured_outputs(\.\w+)?", param, str(e), count=1)
        raise bad_request(msg, param) from None
    return params


def structured_outputs_for(req: SamplingFields) -> StructuredOutputsParams | None:
    """The request's constraint, or None. Two constraint fields at once are a 400."""
    found: list[tuple[str, dict[str, Any], str]] = []  # (field, kwargs, param for errors)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise bad_request(
                "response_format type 'json_schema' needs json_schema.schema",
                "response_format.json_schema.schema",
            )
        schema = rf.json_schema.json_schema
        found.append(("response_format", {"json": schema}, "response_format.json_schema.schema"))
    if req.structured_outputs is not None:
        if not isinstance(req.structured_outputs, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        kw = {k: v for k, v in req.structured_outputs.items() if v is not None}
        kw = {k: v for k, v in kw.items() if k not in ("backend", "whitespace_pattern")}
        # One field set: errors name it (structured_outputs.regex, ...).
        param = f"structured_outputs.{next(iter(kw))}" if len(kw) == 1 else "structured_outputs"
        found.append(("structured_outputs", kw, param))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {kind: value}, name))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(
            f"only one structured-output constraint may be given, got {[f for f, _, _ in found]}",
            found[1][0],
        )
    _, kwargs, param = found[0]
    if "json" in kwargs and not isinstance(kwargs["json"], (dict, str, bool)):
        raise bad_request("a JSON schema must be an object", param)
    return make_structured_params(kwargs, param)
