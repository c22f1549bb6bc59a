"""Three real ``kvasir serve`` replicas of the default model behind real ``kvasir router``
processes: pass-through equality (streamed and not, completions and chat), cache-aware
placement, drain and cordon through the admin API, a replica's own /admin/drain,
hedging around a frozen replica, and chaos (kill -9 mid-load) with stream migration.

The replicas are shared by the module; the chaos test kills one, so it runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from router_utils import RouterProc, metric, start_router
from server_utils import REPO_ROOT, ServerProc, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

PROMPTS = [
    "The history of the Roman Empire",
    "Write a short poem about autumn leaves",
    "Explain how a bicycle works",
    "List three facts about the Moon",
    "Describe a busy market in the morning",
    "What makes bread rise when it is baked",
]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def replicas():
    with ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(start_server, api_key=None) for _ in range(3)]
        srvs = [f.result() for f in futs]
    try:
        yield dict(zip("abc", srvs, strict=True))
    finally:
        for s in srvs:
            s.stop()


def _replica_flags(replicas: dict[str, ServerProc]) -> list[str]:
    out = []
    for rid, s in replicas.items():
        out += ["--replica", f"{rid}={s.url}"]
    return out


@pytest.fixture(scope="module")
def router(replicas):
    r = start_router(
        *_replica_flags(replicas),
        "--policy", "round_robin",
        "--health-interval", "0.3", "--health-timeout", "30",
        "--canary-interval", "0",
        "--eject-base", "30",
    )  # fmt: skip
    _wait_routable(r, 3)
    try:
        yield r
    finally:
        assert r.stop() == 0, r.log()


def _wait_routable(r: RouterProc, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with r.admin() as c:
        while time.monotonic() < deadline:
            reps = c.get("/admin/replicas").json()["replicas"]
            if sum(x["healthy"] and not x["ejected"] and not x["cordoned"] for x in reps) >= n:
                return
            time.sleep(0.1)
    raise AssertionError(f"fewer than {n} routable replicas:\n{r.log()}")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)


def _complete(url: str, prompt: str, n: int = NUM_TOKENS) -> str:
    r = httpx.post(
        url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True},
        timeout=900,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(replicas) -> dict[str, str]:
    """Each prompt's uninterrupted greedy output, straight from one replica."""
    url = replicas["a"].url
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        return dict(zip(PROMPTS, ex.map(lambda p: _complete(url, p), PROMPTS), strict=True))


def _stream_text(
    url: str, prompt: str, n: int = NUM_TOKENS, chat: bool = False, on_start=None
) -> tuple[str, str, list[str]]:
    """Stream a greedy request; returns (text, replica id, raw events)."""
    body = {"max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    events, text = [], []
    with httpx.stream("POST", url + path, json=body, timeout=900) as r:
        assert r.status_code == 200, r.read()
        rid = r.headers.get("x-kvasir-replica", "")
        if on_start is not None:
            on_start(rid)
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if line[6:] == "[DONE]":
                break
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            for c in obj["choices"]:
                text.append(c["delta"].get("content") or "" if chat else c["text"])
    return "".join(text), rid, events


def test_passthrough_equals_direct(router, replicas, reference):
    direct, via = _client(replicas["b"].url), _client(router.url)
    kw = dict(max_tokens=12, temperature=0)
    for p in PROMPTS[:1]:
        a = direct.completions.create(model="SmolLM2-135M-Instruct", prompt=p, **kw)
        b = via.completions.create(model="SmolLM2-135M-Instruct", prompt=p, **kw)
        assert a.choices[0].text == b.choices[0].text
        assert b.usage.completion_tokens == a.usage.completion_tokens
        sa = "".join(c.choices[0].text for c in direct.completions.create(
            model="SmolLM2-135M-Instruct", prompt=p, stream=True, **kw))  # fmt: skip
        sb = "".join(c.choices[0].text for c in via.completions.create(
            model="SmolLM2-135M-Instruct", prompt=p, stream=True, **kw))  # fmt: skip
        assert sa == sb == a.choices[0].text
        msgs = [{"role": "user", "content": p}]
        ca = direct.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, **kw)
        cb = via.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, **kw)
        assert ca.choices[0].message.content == cb.choices[0].message.content
        chunks = list(via.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=msgs, stream=True,
            stream_options={"include_usage": True}, **kw))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            ca.choices[0].message.content
        )
        assert chunks[-1].usage.completion_tokens == ca.usage.completion_tokens
        # The router's own extension fields do not leak to clients.
        assert "token_ids" not in chunks[1].choices[0].model_dump()
    assert [m.id for m in via.models.list().data] == ["SmolLM2-135M-Instruct"]
    tok = httpx.post(router.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert tok == httpx.post(replicas["a"].url + "/tokenize", json={"prompt": "hello world"}).json()
    # The replica's 400 passes through unchanged (not retried, not a 5xx).
    bad = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    # Spread over all three (round robin), each counted under its replica.
    m = httpx.get(router.url + "/metrics").text
    assert all(metric(m, "kvasir_router:requests_total", replica=x) > 0 for x in "abc")


def test_cache_aware_keeps_prefixes_together(replicas):
    r = start_router(*_replica_flags(replicas), "--policy", "cache_aware",
                     "--canary-interval", "0", "--balance-abs-threshold", "64", "--health-timeout", "30")  # fmt: skip
    try:
        _wait_routable(r, 3)
        systems = [f"System {i}: " + (f"you answer questions about topic {i}. ") * 12
                   for i in range(3)]  # fmt: skip
        placed: dict[int, set[str]] = {i: set() for i in range(3)}
        for turn in range(4):
            for i, s in enumerate(systems):
                resp = httpx.post(r.url + "/v1/completions", timeout=900, json={
                    "prompt": s + f"Question {turn}?", "max_tokens": 1, "temperature": 0})  # fmt: skip
                assert resp.status_code == 200
                placed[i].add(resp.headers["x-kvasir-replica"])
        # Each shared prefix always went to one replica, and the three to different ones.
        assert all(len(v) == 1 for v in placed.values()), placed
        assert len(set.union(*placed.values())) == 3, placed
        m = httpx.get(r.url + "/metrics").text
        assert metric(m, "kvasir_router:requests_total", decision="cache_hit") == 9
        assert metric(m, "kvasir_router:requests_total", decision="cache_miss") == 3
    finally:
        r.stop()


def test_drain_finishes_in_flight_then_safe_to_stop(router, replicas, reference):
    p = PROMPTS[0]
    started = threading.Event()
    where: list[str] = []
    out: list[tuple] = []

    def run():
        out.append(
            _stream_text(router.url, p, on_start=lambda rid: (where.append(rid), started.set()))
        )

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(600)
    rid = where[0]
    with router.admin() as c:
        st = c.post(f"/admin/replicas/{rid}/drain").json()
        assert st["draining"] and st["cordoned"]
        assert not st["safe_to_stop"] and st["outstanding"] == 1
        # New work goes elsewhere at once.
        for q in PROMPTS[1:4]:
            resp = httpx.post(router.url + "/v1/completions",
                              json={"prompt": q, "max_tokens": 2}, timeout=600)  # fmt: skip
            assert resp.headers["x-kvasir-replica"] != rid
        st = c.post(f"/admin/replicas/{rid}/drain", params={"wait": 600}).json()
        assert st["safe_to_stop"] and st["outstanding"] == 0
        t.join(600)
        text, _, events = out[0]
        assert text == reference[p] and events[-1] == "[DONE]"
        assert c.post(f"/admin/replicas/{rid}/uncordon").json()["cordoned"] is False
        # Bad input: an unknown replica id, a missing admin key.
        nf = c.post("/admin/replicas/nope/drain")
        assert nf.status_code == 404 and nf.json()["error"]["code"] == "replica_not_found"
        assert c.post(f"/admin/replicas/{rid}/explode").status_code == 404
    assert httpx.get(router.url + "/admin/replicas").status_code == 401


def test_planned_drain_migrates_streams(router, replicas, reference):
    p = PROMPTS[1]
    started = threading.Event()
    where: list[str] = []
    out: list[tuple] = []
    t = threading.Thread(
        target=lambda: out.append(
            _stream_text(
                router.url, p, n=NUM_TOKENS, on_start=lambda rid: (where.append(rid), started.set())
            )
        )
    )
    t.start()
    assert started.wait(600)
    rid = where[0]
    time.sleep(0.3)  # a few tokens in
    with router.admin() as c:
        st = c.post(f"/admin/replicas/{rid}/drain", params={"migrate": "true", "wait": 600}).json()
        assert st["safe_to_stop"]
        t.join(600)
        text, _, events = out[0]
        assert text == reference[p]  # gapless, no duplicate, greedy-identical
        m = httpx.get(router.url + "/metrics").text
        assert metric(m, "kvasir_router:migrations_total", from_replica=rid, reason="drain") == 1
        c.post(f"/admin/replicas/{rid}/uncordon")


def test_replica_admin_drain_is_seen_by_the_router(router, replicas):
    srv = replicas["c"]
    st = httpx.post(srv.url + "/admin/drain").json()
    assert st == {"draining": True, "num_in_flight": 0, "safe_to_stop": True}
    try:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["draining"] is True
        deadline = time.monotonic() + 2
        with router.admin() as c:
            while time.monotonic() < deadline:
                reps = {x["id"]: x for x in c.get("/admin/replicas").json()["replicas"]}
                if reps["c"]["replica_draining"]:
                    break
                time.sleep(0.05)
        assert reps["c"]["replica_draining"]
        for q in PROMPTS:
            resp = httpx.post(router.url + "/v1/completions",
                              json={"prompt": q, "max_tokens": 1}, timeout=600)  # fmt: skip
            assert resp.status_code == 200 and resp.headers["x-kvasir-replica"] != "c"
        assert srv.proc.poll() is None  # drained, not exited
    finally:
        assert httpx.post(srv.url + "/admin/undrain").json()["draining"] is False
    assert httpx.get(srv.url + "/health").json()["draining"] is False
    _wait_routable(router, 3)


def test_hedge_around_a_frozen_replica(replicas):
    r = start_router(*_replica_flags(replicas), "--policy", "round_robin", "--hedge-after", "500",
                     "--canary-interval", "0", "--health-interval", "60", "--health-timeout", "30")  # fmt: skip
    frozen = replicas["b"]
    try:
        _wait_routable(r, 3)
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for q in PROMPTS[:3]:
            resp = httpx.post(r.url + "/v1/completions", timeout=600,
                              json={"prompt": q, "max_tokens": 2, "temperature": 0})  # fmt: skip
            assert resp.status_code == 200 and resp.headers["x-kvasir-replica"] != "b"
        assert time.monotonic() - t0 < 300
        m = httpx.get(r.url + "/metrics").text
        assert metric(m, "kvasir_router:hedges_total", outcome="sent") >= 1
        assert metric(m, "kvasir_router:hedges_total", outcome="hedge_won") >= 1
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        r.stop()


def test_chaos_kill_and_cordon_under_load(router, replicas, reference):
    """kvasir bench serve load plus checked greedy streams; kill -9 one replica while it
    streams, cordon another: every request completes, the checked ones equal the
    uninterrupted outputs, and the router counts the migrations."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "kvasir.entrypoints.cli", "bench", "serve", "--base-url",
         router.url, "--num-prompts", "24", "--max-concurrency", "4", "--input-len", "16",
         "--output-len", "16", "--ignore-eos", "--disable-tqdm", "--timeout", "900"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    where: dict[str, str] = {}
    lock = threading.Lock()
    n_started = threading.Semaphore(0)

    def checked(p: str) -> tuple[str, str]:
        def on_start(rid: str) -> None:
            with lock:
                where[p] = rid
            n_started.release()

        text, _, events = _stream_text(router.url, p, n=32, on_start=on_start)
        assert events[-1] == "[DONE]"
        return p, text

    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        futs = [ex.submit(checked, p) for p in PROMPTS]
        for _ in PROMPTS:
            assert n_started.acquire(timeout=900)
        time.sleep(1.0)  # some tokens generated everywhere
        with lock:
            victim = max("abc", key=lambda x: list(where.values()).count(x))
        srv = replicas[victim]
        os.kill(srv.proc.pid, signal.SIGKILL)
        os.kill(srv.core_pid, signal.SIGKILL)
        cordoned = next(x for x in "abc" if x != victim)
        with router.admin() as c:
            assert c.post(f"/admin/replicas/{cordoned}/cordon").status_code == 200
        results = dict(f.result(timeout=900) for f in futs)
    # Non-streaming requests after the kill: retried away from the dead replica.
    for q in PROMPTS[:2]:
        assert _complete(router.url, q) == reference[q]
    out, _ = bench.communicate(timeout=900)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["completed"] == 24, out
    with router.admin() as c:
        c.post(f"/admin/replicas/{cordoned}/uncordon")
    # The first 16 tokens of each 32-token output are the 16-token reference, and the
    # whole output equals a fresh uninterrupted run on a surviving replica.
    alive = next(x for x in "abc" if x != victim)
    for p, text in results.items():
        assert text.startswith(reference[p]), (p, where[p], text)
    moved = [p for p, rid in where.items() if rid == victim]
    assert moved
    for p in moved:
        assert results[p] == _complete(replicas[alive].url, p, 32)
    m = httpx.get(router.url + "/metrics").text
    assert metric(m, "kvasir_router:migrations_total", from_replica=victim) >= len(moved)
    assert metric(m, "kvasir_router:ejections_total", replica=victim) >= 1
