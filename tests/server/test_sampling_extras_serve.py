"""logit_bias, allowed_token_ids, bad_words, best_of and use_beam_search through a real
``kvasir serve`` (the shared session server), and their bad input as 400s."""

from __future__ import annotations

from server_utils import MODEL

BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6}


def test_logit_bias_and_allowed_token_ids(client) -> None:
    r = client.completions.create(**BODY, temperature=1.0, n=3, seed=0, logit_bias={"1234": 100})
    assert all(c.text == client_decode(client, [1234] * 6) for c in r.choices)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=1.0,
        extra_body={"allowed_token_ids": [330, 331], "ignore_eos": True},
    )  # fmt: skip
    text = chat.choices[0].message.content
    assert text and set(text) <= set(client_decode(client, [330]) + client_decode(client, [331]))


def client_decode(client, ids: list[int]) -> str:
    import httpx

    r = httpx.post(
        str(client.base_url).removesuffix("/v1/") + "/detokenize",
        json={"tokens": ids},
        headers={"Authorization": f"Bearer {client.api_key}"},
    )
    return r.json()["prompt"]


def test_best_of_and_beam_search(client) -> None:
    r = client.completions.create(**BODY, temperature=1.0, n=2, best_of=4, seed=1, logprobs=0)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    scores = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert scores[0] >= scores[1]
    # usage counts all four candidates
    assert r.usage.completion_tokens >= sum(len(c.logprobs.tokens) for c in r.choices)
    beams = client.completions.create(
        **BODY, n=3, temperature=0.0, extra_body={"use_beam_search": True, "length_penalty": 1.0}
    )
    assert len(beams.choices) == 3
    assert len({c.text for c in beams.choices}) == 3
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, n=2,
        extra_body={"use_beam_search": True},
    )  # fmt: skip
    assert len(chat.choices) == 2


BAD = [
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "n": 2, "stream": True}, "best_of"),
    ({"allowed_token_ids": [99999999]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"use_beam_search": True, "stream": True}, "use_beam_search"),
    ({"use_beam_search": True, "n": 11}, "n"),
]


def test_bad_sampling_extras_are_400(http) -> None:
    for body, param in BAD:
        r = http.post("/v1/completions", json={**BODY, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    ok = http.post("/v1/completions", json={**BODY, "temperature": 0})
    assert ok.status_code == 200
