"""``/v1/responses`` through the official openai client (``client.responses.create``
and ``client.responses.stream``) against the shared ``kvasir serve``: text and message
input, instructions, max_output_tokens, sampling, the semantic stream events,
``previous_response_id`` through the in-memory store, and bad input as 400s."""

from __future__ import annotations

import openai
import pytest
from server_utils import MODEL

from kvasir.entrypoints.openai.serving_responses import ResponseStore


def _greedy_chat(client, messages: list[dict], max_tokens: int) -> str:
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.0
    )
    return r.choices[0].message.content


def test_create_text_input_equals_chat(client) -> None:
    r = client.responses.create(
        model=MODEL, input="What is the capital of France?", instructions="Answer in one word.",
        max_output_tokens=8, temperature=0.0,
    )  # fmt: skip
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete")
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant"
    assert r.output_text == msg.content[0].text
    # The same conversation as a chat completion gives the same greedy text.
    ref = _greedy_chat(
        client,
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        8,
    )
    assert r.output_text == ref
    assert r.usage.output_tokens <= 8 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.max_output_tokens == 8 and r.temperature == 0.0


def test_message_list_input_and_max_output_tokens(client) -> None:
    r = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Count from one to twenty."},
            {"role": "assistant", "content": [{"type": "output_text", "text": "One, two,"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Go on."}]},
        ],
        max_output_tokens=3, temperature=0.7, top_p=0.9,
    )  # fmt: skip
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output_text
    assert r.top_p == 0.9


def test_stream_events(client) -> None:
    kinds = []
    deltas = []
    with client.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=6, temperature=0.0
    ) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
    first = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[:4] == first
    last = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-4:-1] == last
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert deltas and set(kinds[4:-4]) == {"response.output_text.delta"}
    ref = client.responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=6, temperature=0.0
    )
    assert "".join(deltas) == ref.output_text


def test_stream_final_response_and_previous_response_id(client) -> None:
    # A short answer that ends on its own: the stream completes.
    with client.responses.stream(
        model=MODEL,
        input="Is the sky blue? Answer yes or no.",
        max_output_tokens=16,
        temperature=0.0,
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text
    follow = client.responses.create(
        model=MODEL, input="Are you sure?", previous_response_id=final.id,
        max_output_tokens=8, temperature=0.0,
    )  # fmt: skip
    assert follow.previous_response_id == final.id
    # The follow-up saw the whole conversation: same text as the chat equivalent.
    ref = _greedy_chat(
        client,
        [
            {"role": "user", "content": "Is the sky blue? Answer yes or no."},
            {"role": "assistant", "content": final.output_text},
            {"role": "user", "content": "Are you sure?"},
        ],
        8,
    )
    assert follow.output_text == ref
    assert client.responses.retrieve(follow.id).output_text == follow.output_text


def test_store_false_and_unknown_previous_response_id(client, http) -> None:
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL, input="again", previous_response_id=r.id, max_output_tokens=2
        )
    assert e.value.body["param"] == "previous_response_id"
    r = http.post(
        "/v1/responses",
        json={"input": "x", "previous_response_id": "resp_nope", "max_output_tokens": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    assert http.get("/v1/responses/resp_nope").status_code == 404


BAD = [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        "input[0].content[0].type",
    ),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "top_p": 0}, "top_p"),
]


def test_bad_input_is_400(http) -> None:
    for body, param in BAD:
        r = http.post("/v1/responses", json={"model": MODEL, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    ok = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert ok.status_code == 200


def test_store_is_bounded() -> None:
    store = ResponseStore(2)
    for i in range(3):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
    assert store.get("r0") is None and store.get("r2") is not None and len(store) == 2
    assert ResponseStore(0).get("r0") is None


# ---------------------------------------------------------------- text.format and tools
# Against the shared tools server (Hermes tool-call parser), through h18a's structured
# outputs and tool calling.

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def tools_client(tools_server):
    return openai.OpenAI(
        base_url=tools_server.url + "/v1", api_key=tools_server.api_key, max_retries=0,
        timeout=300.0,
    )  # fmt: skip


def test_text_format_json_schema(tools_client) -> None:
    import json

    import jsonschema
    from pydantic import BaseModel, Field

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = tools_client.responses.create(
        model=MODEL, input="Make up a person.", max_output_tokens=40, temperature=0.0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema}},
    )  # fmt: skip
    assert r.status == "completed", r.output_text
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"

    class City(BaseModel):
        name: str = Field(max_length=12)
        population: int = Field(ge=0, le=10**8)

    parsed = tools_client.responses.parse(
        model=MODEL, input="A city as JSON.", text_format=City, max_output_tokens=40,
        temperature=0.0,
    )  # fmt: skip
    assert isinstance(parsed.output_parsed, City)


def test_function_tools_required_named_and_streamed(tools_client) -> None:
    import json

    import jsonschema

    ask = "What is the weather in Paris?"
    r = tools_client.responses.create(
        model=MODEL, input=ask, tools=[WEATHER], tool_choice="required",
        max_output_tokens=60, temperature=0.0,
    )  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls), r.output
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), WEATHER["parameters"])
        assert c.call_id
    # A named function, streamed: the call with the function-call events.
    kinds = []
    with tools_client.responses.stream(
        model=MODEL, input=ask, tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40, temperature=0.0,
    ) as stream:  # fmt: skip
        for ev in stream:
            kinds.append(ev.type)
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    (named,) = [o for o in final.output if o.type == "function_call"]
    assert named.name == "get_weather"
    jsonschema.validate(json.loads(named.arguments), WEATHER["parameters"])
    # The call's result goes back through the template, here through
    # previous_response_id (the stored call is part of the conversation).
    cont = tools_client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": '{"temperature": 21}'}],
        max_output_tokens=4, temperature=0.0,
    )  # fmt: skip
    assert cont.output[0].type == "message" and cont.output_text


TOOL_BAD = [
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     "text.format.schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, "tool_choice"),
]  # fmt: skip


def test_bad_format_and_tools_are_400(tools_server) -> None:
    with tools_server.client() as http:
        for body, param in TOOL_BAD:
            r = http.post(
                "/v1/responses",
                json={"model": MODEL, "input": "hi", "max_output_tokens": 4, **body},
            )
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.json())
        ok = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2})
        assert ok.status_code == 200
