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
