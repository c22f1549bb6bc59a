"""Extension cases: vLLM's additions to the OpenAI API, which kvasir implements too
(extra sampling fields, prompt_logprobs, stop_token_ids, /tokenize, /health, /metrics)."""

from __future__ import annotations

from kvasir.conformance.cases_core import MESSAGES, PROMPT, _usage
from kvasir.conformance.registry import Ctx, case, check, expect_error


@case("extension")
def case_ext_health(ctx: Ctx) -> None:
    """GET /health: 200 while serving."""
    r = ctx.http.get("/health")
    check(r.status_code == 200, f"HTTP {r.status_code}")


@case("extension")
def case_ext_version(ctx: Ctx) -> str:
    """GET /version: {"version": ...}."""
    r = ctx.http.get("/version")
    check(r.status_code == 200 and "version" in r.json(), f"HTTP {r.status_code}: {r.text[:100]}")
    return str(r.json()["version"])


@case("extension")
def case_ext_metrics(ctx: Ctx) -> None:
    """GET /metrics: Prometheus text exposition."""
    r = ctx.http.get("/metrics")
    check(r.status_code == 200, f"HTTP {r.status_code}")
    check("# TYPE" in r.text, "no '# TYPE' line: not Prometheus text")


@case("extension")
def case_ext_tokenize_roundtrip(ctx: Ctx) -> None:
    """POST /tokenize then /detokenize gives the text back; counts agree with usage."""
    r = ctx.ok("/tokenize", {"model": ctx.model, "prompt": PROMPT})
    ids = r.get("tokens")
    check(isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids), f"{r}")
    check(r.get("count") == len(ids), "count != len(tokens)")
    d = ctx.ok("/detokenize", {"model": ctx.model, "tokens": ids})
    check(PROMPT in d.get("prompt", ""), f"detokenized {d.get('prompt')!r}")
    u = _usage(ctx.completion(prompt=PROMPT, max_tokens=1), "completion")
    check(u["prompt_tokens"] == len(ids), f"usage.prompt_tokens {u['prompt_tokens']} != {len(ids)}")


@case("extension")
def case_ext_top_k_min_p_repetition_penalty(ctx: Ctx) -> None:
    """top_k=1 is greedy; min_p and repetition_penalty are accepted."""
    greedy = ctx.completion(prompt=PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    top1 = ctx.completion(prompt=PROMPT, max_tokens=8, temperature=1.0, top_k=1)
    check(top1["choices"][0]["text"] == greedy, "top_k=1 at temperature 1 is not greedy")
    ctx.completion(prompt=PROMPT, max_tokens=4, min_p=0.1, repetition_penalty=1.2)


@case("extension")
def case_ext_ignore_eos_min_tokens(ctx: Ctx) -> None:
    """min_tokens=6 with ignore_eos gives exactly max_tokens=6 tokens."""
    b = ctx.chat(messages=MESSAGES, max_tokens=6, min_tokens=6, ignore_eos=True)
    check(_usage(b, "chat")["completion_tokens"] == 6, "completion_tokens != 6")


@case("extension")
def case_ext_prompt_logprobs(ctx: Ctx) -> None:
    """prompt_logprobs=1: one entry per prompt token, the first null."""
    b = ctx.completion(prompt=PROMPT, max_tokens=1, prompt_logprobs=1)
    plp = b["choices"][0].get("prompt_logprobs")
    if plp is None:
        plp = b.get("prompt_logprobs")
    check(isinstance(plp, list), f"no prompt_logprobs list in {list(b['choices'][0])}")
    check(len(plp) == _usage(b, "completion")["prompt_tokens"], "not one per prompt token")
    check(plp[0] is None, "the first prompt token has a logprob")


@case("extension")
def case_ext_stop_token_ids(ctx: Ctx) -> None:
    """stop_token_ids: generation ends at that token with finish_reason "stop"."""
    r = ctx.completion(prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    tokens = r["choices"][0]["logprobs"]["tokens"]
    if len(tokens) < 3:
        check(False, f"greedy completion too short: {tokens}")
    tid = ctx.ok(
        "/tokenize", {"model": ctx.model, "prompt": tokens[2], "add_special_tokens": False}
    )
    ids = tid["tokens"]
    check(len(ids) >= 1, "tokenize gave nothing")
    b = ctx.completion(prompt=PROMPT, max_tokens=6, temperature=0, stop_token_ids=[ids[-1]])
    c = b["choices"][0]
    check(c["finish_reason"] == "stop", f"finish_reason {c['finish_reason']!r}")
    check(_usage(b, "completion")["completion_tokens"] <= 3, "did not stop at the token")


@case("extension")
def case_ext_include_stop_str_in_output(ctx: Ctx) -> None:
    """include_stop_str_in_output keeps the stop string at the end of the text."""
    full = ctx.completion(prompt=PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    words = full.split()
    check(len(words) >= 2, f"greedy text too short: {full!r}")
    stop = words[1]
    c = ctx.completion(prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                       include_stop_str_in_output=True)["choices"][0]  # fmt: skip
    check(c["text"].endswith(stop), f"{c['text']!r} does not end with {stop!r}")


@case("extension")
def case_ext_chat_continue_final_message(ctx: Ctx) -> None:
    """continue_final_message with add_generation_prompt=false continues the assistant."""
    msgs = [*MESSAGES, {"role": "assistant", "content": "Red, green and"}]
    b = ctx.chat(messages=msgs, max_tokens=4, temperature=0, add_generation_prompt=False,
                 continue_final_message=True)  # fmt: skip
    check(isinstance(b["choices"][0]["message"]["content"], str), "no content")


@case("extension")
def case_ext_error_stop_token_ids_type(ctx: Ctx) -> str:
    """stop_token_ids with a string in it: 400."""
    r = ctx.post("/v1/completions",
                 {"model": ctx.model, "prompt": "x", "stop_token_ids": ["a"]})  # fmt: skip
    return expect_error(r, (400,), "stop_token_ids")


@case("extension")
def case_ext_error_top_k_range(ctx: Ctx) -> str:
    """top_k=-5 (vLLM: -1 or >= 1): 400 naming top_k."""
    r = ctx.post("/v1/completions", {"model": ctx.model, "prompt": "x", "top_k": -5})
    return expect_error(r, (400,), "top_k")
