"""Real clients against a real ``kvasir serve``: litellm (``openai/`` provider with
``api_base``) and langchain-openai (``ChatOpenAI`` / ``OpenAI`` with ``base_url``):
completions, chat, streaming and an error case, each checked against the same request
sent as plain HTTP (greedy, so the texts must be equal)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from kvasir_server import API_KEY, Server

MESSAGES = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


def _raw(srv: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def model(kvasir_server: Server) -> str:
    r = httpx.get(kvasir_server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return r.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def want(kvasir_server: Server, model: str) -> dict[str, str]:
    chat = _raw(kvasir_server, "/v1/chat/completions",
                {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0})  # fmt: skip
    comp = _raw(kvasir_server, "/v1/completions",
                {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})  # fmt: skip
    return {
        "chat": chat["choices"][0]["message"]["content"],
        "completion": comp["choices"][0]["text"],
    }


@pytest.fixture(scope="module")
def litellm(monkeypatch_module: pytest.MonkeyPatch) -> Any:
    # litellm fetches its model-cost map from the internet at import unless told not to
    monkeypatch_module.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    return litellm


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.timeout(1200)
def test_litellm_completion_chat_stream_error(
    litellm: Any, kvasir_server: Server, model: str, want: dict[str, str]
) -> None:
    kw = {"model": f"openai/{model}", "api_base": kvasir_server.url + "/v1", "api_key": API_KEY,
          "max_tokens": 8, "temperature": 0}  # fmt: skip
    r = litellm.completion(messages=MESSAGES, **kw)
    assert r.choices[0].message.content == want["chat"]
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    chunks = list(litellm.completion(messages=MESSAGES, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["chat"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] in (
        ["length"], ["stop"],
    )  # fmt: skip
    t = litellm.text_completion(prompt=PROMPT, **kw)
    assert t.choices[0].text == want["completion"]
    with pytest.raises(litellm.BadRequestError) as e:
        litellm.completion(messages=MESSAGES, **{**kw, "temperature": -1})
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(messages=MESSAGES, **{**kw, "api_key": "wrong"})


@pytest.mark.timeout(1200)
def test_langchain_openai_chat_stream_completion_error(
    kvasir_server: Server, model: str, want: dict[str, str]
) -> None:
    import openai
    from langchain_openai import ChatOpenAI, OpenAI

    base = kvasir_server.url + "/v1"
    chat = ChatOpenAI(model=model, base_url=base, api_key=API_KEY, max_tokens=8, temperature=0,
                      max_retries=0)  # fmt: skip
    msg = chat.invoke([("user", MESSAGES[0]["content"])])
    assert msg.content == want["chat"]
    assert msg.usage_metadata is not None and msg.usage_metadata["output_tokens"] <= 8
    streamed = "".join(str(c.content) for c in chat.stream([("user", MESSAGES[0]["content"])]))
    assert streamed == want["chat"]
    llm = OpenAI(model=model, base_url=base, api_key=API_KEY, max_tokens=8, temperature=0,
                 max_retries=0)  # fmt: skip
    assert llm.invoke(PROMPT) == want["completion"]
    bad = ChatOpenAI(model=model, base_url=base, api_key=API_KEY, temperature=0, max_retries=0,
                     top_p=1.5)  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        bad.invoke("hi")
    assert e.value.status_code == 400 and "top_p" in str(e.value)
