"""/v1/completions and /v1/chat/completions through the official openai client:
streaming vs not, n, logprobs, stop strings, seeds, echo, token-id prompts, prefix
cache accounting with cache_salt."""

from __future__ import annotations

import json
import math

import httpx
from server_utils import MODEL, ServerProc

PROMPT = "The capital of France is"


def _sse_events(resp: httpx.Response) -> list[str]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
        else:
            assert line == "", line
    return events


def test_completion_stream_equals_non_stream(client) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=1234)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.model == MODEL
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == 5  # "The capital of France is" in SmolLM2's BPE
    assert full.usage.total_tokens == 17

    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == choice.text
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == 5


def test_raw_stream_ends_with_done_and_one_finish_reason(server: ServerProc, http) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    finish = [c["finish_reason"] for o in objs for c in o["choices"] if c["finish_reason"]]
    assert finish == ["length"]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 6
    assert objs[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_equals_non_stream(client) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0.7, seed=7)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.object == "chat.completion"
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == msg.content
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == full.choices[0].finish_reason
    assert all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_seed_reproducible_and_n(client) -> None:
    kw = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=6,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw, seed=42)
    b = client.completions.create(**kw, seed=42)
    assert a.choices[0].text == b.choices[0].text
    two = client.completions.create(**kw, seed=42, n=2)
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.usage.completion_tokens == 12 and two.usage.prompt_tokens == a.usage.prompt_tokens

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        n=2,
        temperature=1.0,
        seed=3,
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]
    stream = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            n=2,
            temperature=1.0,
            seed=3,
            stream=True,
        )
    )
    for i in (0, 1):
        mine = [c.choices[0] for c in stream if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == chat.choices[i].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
        assert mine[-1].finish_reason == "length"


def test_completion_logprobs_and_echo(client) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert tlp <= 0 and len(top) >= 3
        # Greedy: the sampled token is the most likely one.
        assert math.isclose(tlp, max(top.values()), abs_tol=1e-4)
        assert top[tok] == tlp
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-4

    e = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    assert e.choices[0].text == PROMPT + r.choices[0].text
    elp = e.choices[0].logprobs
    assert len(elp.tokens) == 5 + 4
    assert elp.token_logprobs[0] is None and all(x <= 0 for x in elp.token_logprobs[1:])
    assert "".join(elp.tokens) == e.choices[0].text
    assert elp.token_logprobs[5:] == lp.token_logprobs


def test_chat_logprobs_top_logprobs(client) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say yes."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert math.isclose(c.logprob, c.top_logprobs[0].logprob, abs_tol=1e-4)
        assert c.bytes == list(c.token.encode())


def test_stop_strings(client) -> None:
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    text = base.choices[0].text  # " Paris.\n\nThe answer is: ..."
    stop = text[3:5]
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_token_id_prompts_and_batches(client, http) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert len(ids) == 5
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model=MODEL, prompt=[ids, ids[:3]], max_tokens=6, temperature=0
    )
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == 8
    strs = client.completions.create(
        model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=6, temperature=0, stream=True
    )
    texts: dict[int, str] = {}
    for c in strs:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts[0] == by_text.choices[0].text and set(texts) == {0, 1}


def test_cached_tokens_and_cache_salt(client) -> None:
    # A long shared prefix (several 16-token blocks), then a short distinct question.
    system = "You are a helpful assistant. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens > 64
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached < again.usage.prompt_tokens
    salted = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"cache_salt": "tenant-b"}
    )
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    stream = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[-1].usage.prompt_tokens_details.cached_tokens >= 64


def test_models_version_tokenize(http, server: ServerProc) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 2048
    assert httpx.get(server.url + "/version").json()["version"]
    t = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert t["count"] == len(t["tokens"]) > 3 and t["max_model_len"] == 2048
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/version",
    ):
        assert path in schema["paths"]
    post = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]
