"""Structured outputs through a real ``kvasir serve`` (xgrammar): the openai client's
``parse`` with Pydantic models, JSON object mode, regex, choice and an EBNF grammar on
seeded samples, each output checked by an independent validator (jsonschema, ``re``,
a recursive-descent parser); bad constraints are 400s naming the field."""

from __future__ import annotations

import concurrent.futures
import json
import re
from enum import Enum
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import API_KEY, MODEL, ServerProc

# Slow (default-model server requests; parts never run in their final form through pytest): `make test-slow`, not `make test`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tools_server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=tools_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300.0
    )


@pytest.fixture(scope="module")
def http(tools_server: ServerProc):
    with tools_server.client(timeout=300.0) as c:
        yield c


# ---------------------------------------------------------------- ten schemas


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Line(BaseModel):  # nested objects
    start: Point
    end: Point


class Tags(BaseModel):  # array of bounded strings
    tags: list[Color] = Field(min_length=1, max_length=3)


class Paint(BaseModel):  # enum
    color: Color
    coats: int = Field(ge=1, le=3)


class Price(BaseModel):  # numbers with bounds
    amount: float = Field(ge=0, le=1000)
    discount: float = Field(ge=0, le=1)


class Maybe(BaseModel):  # optional fields
    title: str = Field(max_length=10)
    subtitle: str | None = Field(max_length=10)


class Flags(BaseModel):  # booleans and a literal
    enabled: bool
    mode: Literal["fast", "slow"]


class Team(BaseModel):  # array of objects
    members: list[Person] = Field(min_length=1, max_length=2)


Digit = Annotated[int, Field(ge=0, le=9)]


class Grid(BaseModel):  # array of integer arrays
    rows: list[Annotated[list[Digit], Field(min_length=1, max_length=3)]] = Field(
        min_length=1, max_length=2
    )


SCHEMAS: list[type[BaseModel]] = [Person, Point, Line, Tags, Paint, Price, Maybe, Flags, Team, Grid]


def test_parse_ten_pydantic_schemas(client: openai.OpenAI) -> None:
    def one(model: type[BaseModel]):
        return client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": f"Reply with a {model.__name__} as JSON."}],
            response_format=model,
            max_completion_tokens=120,
            temperature=0,
        )

    # Concurrent: the engine batches them (and compiles the ten grammars off its loop).
    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(one, SCHEMAS))
    for model, r in zip(SCHEMAS, results, strict=True):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (model.__name__, choice.message.content)
        parsed = choice.message.parsed
        assert isinstance(parsed, model), (model.__name__, choice.message.content)
        # Independently of pydantic: the raw text against the JSON schema.
        jsonschema.validate(json.loads(choice.message.content), model.model_json_schema())


def test_json_object_and_completions_json_schema(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Describe a cat in JSON."}],
            "response_format": {"type": "json_object"},
            "max_tokens": 60,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a JSON-object prefix
        assert text.lstrip().startswith("{")
    schema = Paint.model_json_schema()
    r = http.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "Paint order as JSON:",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": schema},
            },
            "max_tokens": 40,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


# ---------------------------------------------------------------- regex / choice / grammar


def _samples(http: httpx.Client, extra: dict, prompt: str, max_tokens: int) -> list[str]:
    r = http.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "n": 50,
            "seed": 1234,
            "temperature": 1.0,
            "max_tokens": max_tokens,
            **extra,
        },
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 50
    assert all(c["finish_reason"] == "stop" for c in choices), choices
    return [c["text"] for c in choices]


def test_regex_holds_on_50_seeded_samples(http: httpx.Client) -> None:
    pattern = r"[A-Z][a-z]{1,6} [0-9]{2}-[0-9]{3}"
    texts = _samples(http, {"guided_regex": pattern}, "Name and code:", 16)
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    assert len(set(texts)) > 1  # seeded samples differ: the mask does not fix the output


def test_choice_holds_on_50_seeded_samples(http: httpx.Client) -> None:
    choices = ["yes", "no", "maybe later"]
    texts = _samples(http, {"structured_outputs": {"choice": choices}}, "Will it rain? Answer:", 8)
    assert set(texts) <= set(choices), texts


# At most 3 terms of at most 2 factors of at most "(dd+dd)": 47 characters, so
# max_tokens=56 always leaves room to finish (a digit is at least one token).
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,2}
term ::= factor (("*" | "/") factor){0,1}
factor ::= number | "(" number ("+" | "-") number ")"
number ::= [1-9] [0-9]{0,1}
"""


def _parse_arithmetic(s: str) -> bool:
    """An independent recursive-descent parser of the grammar above's language."""
    pos = 0

    def number() -> bool:
        nonlocal pos
        m = re.compile(r"[1-9][0-9]?").match(s, pos)
        if not m:
            return False
        pos = m.end()
        return True

    def factor() -> bool:
        nonlocal pos
        if s.startswith("(", pos):
            pos += 1
            if not number() or pos >= len(s) or s[pos] not in "+-":
                return False
            pos += 1
            if not number() or not s.startswith(")", pos):
                return False
            pos += 1
            return True
        return number()

    def chain(item, ops: str, more: int) -> bool:
        nonlocal pos
        if not item():
            return False
        for _ in range(more):
            if pos < len(s) and s[pos] in ops:
                pos += 1
                if not item():
                    return False
        return True

    ok = chain(lambda: chain(factor, "*/", 1), "+-", 2)
    return ok and pos == len(s)


def test_ebnf_arithmetic_grammar_parses_every_output(http: httpx.Client) -> None:
    texts = _samples(http, {"guided_grammar": ARITHMETIC}, "A sum:", 56)
    assert all(_parse_arithmetic(t) for t in texts), [t for t in texts if not _parse_arithmetic(t)]
    # The checker can fail: a dangling operator, a product in parentheses, 3 factors.
    assert _parse_arithmetic("(1+2)*34-5")
    assert not any(map(_parse_arithmetic, ["1+", "(1*2)", "1*2*3", "123"]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"guided_regex": "(ab"}, "guided_regex"),
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"guided_json": {"type": "object", "properties": 5}}, "guided_json"),
        ("/v1/completions", {"guided_grammar": "root ::= "}, "guided_grammar"),
        ("/v1/completions", {"guided_choice": []}, "guided_choice"),
        ("/v1/completions", {"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        (
            "/v1/completions",
            {"structured_outputs": {"json": {}, "regex": "a"}},
            "structured_outputs",
        ),
        ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_bad_constraint_is_400_naming_the_field(
    http: httpx.Client, path: str, extra: dict, param: str
) -> None:
    body: dict = {"model": MODEL, "max_tokens": 4, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
