"""Every client mistake is an OpenAI error object with the right status and ``param``,
never a 500, and the server keeps serving right after each."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_utils import MODEL, ServerProc

OK_BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}


def _assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param, err
    return err


def _still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json=OK_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**OK_BODY, "temperature": -1}, "temperature"),
        ("/v1/completions", {**OK_BODY, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**OK_BODY, "top_p": 0}, "top_p"),
        ("/v1/completions", {**OK_BODY, "top_k": 0}, "top_k"),
        ("/v1/completions", {**OK_BODY, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {**OK_BODY, "max_tokens": 5000}, "max_tokens"),
        ("/v1/completions", {**OK_BODY, "n": 0}, "n"),
        ("/v1/completions", {**OK_BODY, "logprobs": 50}, "logprobs"),
        ("/v1/completions", {**OK_BODY, "min_tokens": 5}, "min_tokens"),
        ("/v1/completions", {**OK_BODY, "stop": [""]}, "stop"),
        ("/v1/completions", {**OK_BODY, "prompt": ""}, "prompt"),
        ("/v1/completions", {**OK_BODY, "prompt": []}, "prompt"),
        ("/v1/completions", {**OK_BODY, "prompt": [1, 99999999]}, "prompt"),
        ("/v1/completions", {**OK_BODY, "prompt": "hi " * 3000}, "prompt"),
        ("/v1/completions", {"model": MODEL, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {**OK_BODY, "presence_penalty": 3}, "presence_penalty"),
        (
            "/v1/completions",
            {**OK_BODY, "stream_options": {"include_usage": "x"}},
            "stream_options.include_usage",
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 4000,
            },
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "repetition_penalty": 0,
            },
            "repetition_penalty",
        ),
        ("/detokenize", {"tokens": [5, -1]}, "tokens[1]"),
    ],
)
def test_invalid_parameter_is_400_naming_it(http, path: str, body: dict, param: str) -> None:
    err = _assert_error(http.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    _still_serving(http)


def test_malformed_json_and_non_object_body(http) -> None:
    for content in (b"{not json", b"[1, 2, 3]", b'"a string"', b""):
        r = http.post(
            "/v1/completions", content=content, headers={"Content-Type": "application/json"}
        )
        _assert_error(r, 400, None)
        r = http.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        _assert_error(r, 400, None)
    _still_serving(http)


def test_unknown_model_is_404(client, http) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    _assert_error(
        http.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        ),
        404,
        "model",
    )
    _still_serving(http)


def test_api_key_required_on_inference_paths(server: ServerProc, http) -> None:
    paths = [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        for method, path in paths:
            r = httpx.request(method, server.url + path, json=OK_BODY, headers=headers)
            err = _assert_error(r, 401, None)
            assert err["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(server.url + path).status_code == 200
    _still_serving(http)


def test_body_over_limit_is_413(server: ServerProc, http) -> None:
    big = {**OK_BODY, "prompt": "x" * (9 * 2**20)}  # default limit: 8 MiB
    _assert_error(http.post("/v1/completions", json=big), 413, None)

    # Without a Content-Length (chunked upload) the limit holds too.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 2**20
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    _assert_error(r, 413, None)
    _still_serving(http)


def test_unsupported_features_are_400(http) -> None:
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        (  # this server parses no tool calls (no --enable-auto-tool-choice)
            {
                "model": MODEL,
                "messages": msgs,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "auto",
            },
            "tool_choice",
        ),
        (
            {"model": MODEL, "messages": msgs, "response_format": {"type": "json_schema"}},
            "response_format.json_schema.schema",
        ),
        ({"model": MODEL, "messages": msgs, "logit_bias": {"5": 101.0}}, "logit_bias"),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
            "messages[0].content[0].type",
        ),
    ]
    for body, param in cases:
        _assert_error(http.post("/v1/chat/completions", json=body), 400, param)
    _still_serving(http)
