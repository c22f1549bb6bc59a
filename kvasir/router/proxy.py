"""Forwarding one client request: choose a replica, retry before the first byte,
hedge a slow first byte, copy to a shadow version, and migrate a broken stream.

Migration: a streamed completion or chat completion (n = 1) is asked of the replica with
``return_token_ids`` (vLLM's extension), so the router knows the prompt's token ids and
every generated token id. If the replica dies or drops the stream, the router sends
prompt + generated ids as a token-id ``/v1/completions`` continuation (same sampling
parameters, ``max_tokens`` less what was generated) to another replica, first emits any
text the old replica held back (the detokenised ids minus what the client saw), and
rewrites the continuation's events into the original stream's format (id, object,
chat deltas). With greedy decoding the client sees exactly the uninterrupted output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvasir.router.fleet import Fleet
from kvasir.router.metrics import RouterMetrics
from kvasir.router.policy import RequestKey
from kvasir.router.replica import Replica

logger = logging.getLogger(__name__)

# Request headers passed to the replica (hop-by-hop ones and the length are not).
_DROP_REQUEST = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "accept-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
}
_DROP_RESPONSE = {
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-encoding",
    "date",
    "server",
}
# Replica answers worth another replica: it is overloaded, draining or broken.
_RETRY_STATUS = {429, 500, 502, 503, 504}
# Sampling fields a continuation keeps (penalties over the output see the replayed
# tokens as prompt: presence/frequency penalties are therefore not exact after a move).
_KEEP_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "cache_salt",
    "priority",
    "user",
)
_MIGRATABLE_PATHS = {"/v1/completions", "/v1/chat/completions"}


class Broken(Exception):
    """The upstream stream ended without ``[DONE]`` or with a replica-side error."""


def error_response(
    status: int,
    message: str,
    code: str,
    retry_after: int | None = None,
    err_type: str = "service_unavailable_error",
    param: str | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def traceparent(headers: dict[str, str]) -> dict[str, str]:
    """W3C trace context: the caller's ``traceparent`` passes through untouched (the
    replica's server span becomes its child); without one the router starts a trace."""
    if "traceparent" in headers:
        return {}
    return {"traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"}


@dataclass
class Call:
    """One client request on its way through the router."""

    path: str
    method: str
    headers: dict[str, str]
    body: dict | None
    raw: bytes
    query: str
    key: RequestKey
    model: str | None
    user: str | None
    stream: bool
    t0: float = field(default_factory=time.perf_counter)
    tried: set[str] = field(default_factory=set)
    num_retries: int = 0
    version: str | None = None
    wants_ids: bool = False  # the client itself asked for return_token_ids


def prompt_text(body: dict | None) -> str:
    """The text the cache-aware policy matches on: the prompt, or the chat messages'
    contents in order (the chat template is the same on every replica)."""
    if not body:
        return ""
    p = body.get("prompt")
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p:
        if isinstance(p[0], str):
            return p[0]
        if isinstance(p[0], int):
            return " ".join(map(str, p))
    msgs = body.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, list):
                    c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
                parts.append(f"<{m.get('role')}>{c if isinstance(c, str) else ''}")
        return "".join(parts)
    inp = body.get("input")
    return inp if isinstance(inp, str) else ""


class Proxy:
    def __init__(self, fleet: Fleet, metrics: RouterMetrics, api_key: str | None = None) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.api_key = api_key  # sent to replicas by health checks and continuations
        cfg = fleet.cfg
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512),
        )
        self.shadow_log: list[dict] = []  # the last shadow results (GET /admin/shadow)
        self._background: set[asyncio.Task] = set()

    @property
    def cfg(self):  # the live config (reloads swap it)
        return self.fleet.cfg

    async def aclose(self) -> None:
        for t in list(self._background):
            t.cancel()
        await self.client.aclose()

    # ------------------------------------------------------------------ entry

    async def handle(self, call: Call) -> Response:
        if call.body is not None and self.cfg.models.get(call.model or "") is not None:
            route = self.cfg.models[call.model or ""]
            if route.shadow:
                self._spawn(self._shadow(call, route.shadow))
        call.wants_ids = bool((call.body or {}).get("return_token_ids"))
        if call.stream and call.body is not None and self._migratable(call):
            # The ids the router replays if this stream has to move (stripped again for
            # clients that did not ask for them).
            call.body = {**call.body, "return_token_ids": True}
        exclude: set[str] = set()
        for _ in range(self.cfg.max_retries + 1):
            got = await self._open_with_retries(call, exclude=exclude)
            if isinstance(got, Response):
                if got.status_code == 503 and "retry-after" not in got.headers:
                    got.headers["Retry-After"] = str(self.cfg.retry_after_s)
                self.metrics.responses.labels(str(got.status_code)).inc()
                return got
            replica, resp = got
            if call.stream and resp.headers.get("content-type", "").startswith("text/event-stream"):
                self.metrics.responses.labels(str(resp.status_code)).inc()
                return StreamingResponse(
                    self._relay(call, replica, resp),
                    status_code=resp.status_code,
                    headers=_response_headers(resp, replica),
                    media_type="text/event-stream",
                )
            try:
                content = await resp.aread()
            except httpx.TransportError as e:
                # The replica died mid-body: nothing reached the client, so retry.
                self._failed(replica, f"body: {type(e).__name__}")
                self.metrics.retries.labels(replica.id, type(e).__name__).inc()
                exclude.add(replica.id)
                continue
            finally:
                await resp.aclose()
                self._done(replica)
            self.metrics.latency.labels(replica.id, replica.spec.version).observe(
                time.perf_counter() - call.t0
            )
            if resp.status_code < 500:
                replica.record(True, self.cfg)
            self.metrics.responses.labels(str(resp.status_code)).inc()
            return Response(content, resp.status_code, headers=_response_headers(resp, replica))
        return error_response(
            503,
            "every replica failed this request; retry later",
            "replicas_failed",
            retry_after=self.cfg.retry_after_s,
        )

    # ------------------------------------------------------------------ choosing + sending

    def _pick(self, call: Call, exclude: set[str]) -> tuple[Replica, str] | None:
        cands, version = self.fleet.candidates(call.model, call.user, exclude)
        if not cands:
            return None
        call.version = version or call.version
        replica, decision = self.fleet.policy.choose(cands, call.key)
        return replica, decision

    def _no_replica(self) -> Response:
        self.metrics.no_replica.inc()
        return error_response(
            503,
            "No healthy replica can take this request; retry later.",
            "no_healthy_replica",
            retry_after=self.cfg.retry_after_s,
        )

    def _request(
        self, call: Call, replica: Replica, body: dict | None = None, path: str | None = None
    ) -> httpx.Request:
        headers = {k: v for k, v in call.headers.items() if k not in _DROP_REQUEST}
        headers.update(traceparent(headers))
        if body is None and call.body is not None:
            body = call.body
        if body is not None:
            body = self._for_replica(body, replica)
            content = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        else:
            content = call.raw
        url = replica.url + (path or call.path) + (f"?{call.query}" if call.query else "")
        return self.client.build_request(call.method, url, headers=headers, content=content)

    def _for_replica(self, body: dict, replica: Replica) -> dict:
        """The public model name becomes the replica's own when the config maps it onto
        versions (v1 and v2 replicas serve their own names)."""
        model = body.get("model")
        if model in self.cfg.models and replica.models and model not in replica.models:
            body = {**body, "model": replica.models[0]}
        return body

    def _start(self, replica: Replica, decision: str, call: Call) -> None:
        replica.outstanding += 1
        self.metrics.requests.labels(
            replica.id, self.fleet.policy.name, decision, replica.spec.version
        ).inc()
        self.metrics.outstanding.labels(replica.id).set(replica.outstanding)
        self.fleet.policy.routed(replica, call.key)

    def _done(self, replica: Replica) -> None:
        replica.outstanding -= 1
        self.metrics.outstanding.labels(replica.id).set(replica.outstanding)

    def _failed(self, replica: Replica, reason: str) -> None:
        if replica.record(False, self.cfg, reason):
            logger.warning("ejecting replica %s (%s)", replica.id, reason)
            replica.healthy = False
            self.metrics.ejections.labels(replica.id, "passive").inc()
            self.fleet.update_gauges()
            on_eject = getattr(self, "on_eject", None)
            if on_eject is not None:
                on_eject(replica)

    async def _send(
        self, call: Call, replica: Replica, body: dict | None = None, path: str | None = None
    ) -> httpx.Response:
        req = self._request(call, replica, body, path)
        resp = await self.client.send(req, stream=True)
        self.metrics.ttfb.labels(replica.id).observe(time.perf_counter() - call.t0)
        return resp

    async def _open_with_retries(
        self,
        call: Call,
        body: dict | None = None,
        path: str | None = None,
        exclude: set[str] | None = None,
    ) -> tuple[Replica, httpx.Response] | Response:
        """Send to a chosen replica; on a connection error, a timeout or a 429/5xx answer
        (nothing has reached the client yet) try another one, up to --max-retries."""
        exclude = set() if exclude is None else exclude
        last: Response | None = None
        for attempt in range(self.cfg.max_retries + 1):
            picked = self._pick(call, exclude)
            if picked is None:
                # Everyone was tried: try a replica again rather than give up early.
                if exclude and attempt < self.cfg.max_retries:
                    exclude = set()
                    picked = self._pick(call, exclude)
                if picked is None:
                    return last if last is not None else self._no_replica()
            replica, decision = picked
            if attempt:
                call.num_retries += 1
            try:
                replica, resp = await self._hedged(call, replica, decision, body, path, exclude)
            except (httpx.TransportError, Broken) as e:
                reason = type(e).__name__
                self.metrics.retries.labels(replica.id, reason).inc()
                exclude.add(replica.id)
                last = error_response(
                    503,
                    f"replica {replica.id} failed ({reason}); retry later",
                    "replicas_failed",
                    retry_after=self.cfg.retry_after_s,
                )
                continue
            if resp.status_code in _RETRY_STATUS:
                content = await resp.aread()
                await resp.aclose()
                self._done(replica)
                code = _error_code(content)
                if code == "server_draining":
                    replica.replica_draining = True  # stop sending it new work at once
                elif resp.status_code != 429:
                    self._failed(replica, f"HTTP {resp.status_code}")
                self.metrics.retries.labels(replica.id, f"http_{resp.status_code}").inc()
                exclude.add(replica.id)
                last = Response(content, resp.status_code, headers=_response_headers(resp, replica))
                continue
            return replica, resp
        return last if last is not None else self._no_replica()

    async def _hedged(
        self,
        call: Call,
        replica: Replica,
        decision: str,
        body: dict | None,
        path: str | None,
        exclude: set[str],
    ) -> tuple[Replica, httpx.Response]:
        """Send; with --hedge-after, a second copy goes to another replica if no first
        byte came in time. The first answer wins; the other is cancelled."""
        self._start(replica, decision, call)
        first = asyncio.ensure_future(self._send(call, replica, body, path))
        hedge_s = self.cfg.hedge_after_ms / 1000.0
        other = None
        if hedge_s > 0 and (call.body is not None or body is not None):
            done, _ = await asyncio.wait({first}, timeout=hedge_s)
            if not done:
                other = self._pick(call, exclude | {replica.id})
        if other is None:
            try:
                return replica, await first
            except BaseException as e:
                self._done(replica)
                if isinstance(e, httpx.TransportError):
                    self._failed(replica, type(e).__name__)
                raise
        r2, d2 = other
        self._start(r2, "hedge", call)
        self.metrics.hedges.labels("sent").inc()
        second = asyncio.ensure_future(self._send(call, r2, body, path))
        tasks = {first: replica, second: r2}
        pending = set(tasks)
        error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                r = tasks[t]
                if t.exception() is None and t.result().status_code not in _RETRY_STATUS:
                    for p in pending:
                        p.cancel()
                    for p in tasks:
                        if p is not t:
                            self._spawn(self._discard(p, tasks[p]))
                    self.metrics.hedges.labels("primary_won" if t is first else "hedge_won").inc()
                    return r, t.result()
                error = t.exception() or error
        # Both failed: report the primary's outcome to the retry loop.
        for t, r in tasks.items():
            if t is not first:
                self._spawn(self._discard(t, r))
        if first.exception() is not None:
            self._done(replica)
            raise first.exception()  # type: ignore[misc]
        assert error is None or isinstance(error, BaseException)
        return replica, first.result()

    async def _discard(self, task: asyncio.Future, replica: Replica) -> None:
        try:
            resp = await task
            await resp.aclose()
        except BaseException:
            pass
        finally:
            self._done(replica)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ shadow

    async def _shadow(self, call: Call, version: str) -> None:
        """A copy to the shadow version; its answer is recorded, never returned."""
        cands = [
            r for r in self.fleet.replicas.values() if r.spec.version == version and r.routable
        ]
        if not cands:
            self.metrics.shadow.labels(version, "no_replica").inc()
            return
        replica, _ = self.fleet.policy.choose(cands, RequestKey())
        assert call.body is not None
        body = {**call.body, "stream": False}
        body.pop("stream_options", None)
        t0 = time.perf_counter()
        try:
            req = self._request(call, replica, body)
            resp = await self.client.send(req)
            status = str(resp.status_code)
            out: Any = resp.json() if resp.status_code == 200 else resp.text[:500]
        except httpx.HTTPError as e:
            status, out = type(e).__name__, None
        dt = time.perf_counter() - t0
        self.metrics.shadow.labels(version, status).inc()
        self.metrics.shadow_latency.labels(version).observe(dt)
        self.shadow_log.append(
            {
                "version": version,
                "replica": replica.id,
                "status": status,
                "latency_s": round(dt, 4),
                "output": out,
            }
        )
        del self.shadow_log[:-100]

    # ------------------------------------------------------------------ streaming + migration

    def _migratable(self, call: Call) -> bool:
        b = call.body or {}
        return (
            call.path in _MIGRATABLE_PATHS
            and self.cfg.migration_limit > 0
            and b.get("n", 1) == 1
            and not b.get("echo")
            and not b.get("tools")
            and not b.get("response_format")
            and not b.get("logprobs")
        )

    async def _release(self, stream: _Stream) -> None:
        if not stream.released:
            stream.released = True
            stream.replica.streams.discard(stream)
            await stream.resp.aclose()
            self._done(stream.replica)

    async def _relay(
        self, call: Call, replica: Replica, resp: httpx.Response
    ) -> AsyncIterator[bytes]:
        """Pass the replica's SSE events to the client; migrate on a break."""
        migratable = self._migratable(call)
        want_ids = call.wants_ids
        chat = call.path == "/v1/chat/completions"
        st = _StreamState()
        num_moves = 0
        cont = False  # events come from a continuation (a /v1/completions stream)
        stream = _Stream(resp, replica)
        replica.streams.add(stream)
        try:
            while True:
                try:
                    async for obj in _events(stream.resp):
                        if obj is None:  # [DONE]
                            stream.replica.record(True, self.cfg)
                            yield b"data: [DONE]\n\n"
                            return
                        err = obj.get("error")
                        if err is not None:
                            if migratable and err.get("code") in ("engine_dead", "server_draining"):
                                raise Broken(err.get("code"))
                            yield _sse(obj)
                            continue
                        st.observe(obj, cont)
                        if cont:
                            obj = st.rewrite(obj, chat)
                            if obj is None:
                                continue
                        if not want_ids:
                            for c in obj.get("choices", ()):
                                c.pop("token_ids", None)
                                c.pop("prompt_token_ids", None)
                        yield _sse(obj)
                        if stream.move_requested and not st.finished:
                            raise Broken("drain")  # after the event: the client has it
                    raise Broken("stream ended without [DONE]")
                except (httpx.HTTPError, httpx.StreamError, Broken) as e:
                    old = stream.replica
                    reason = "drain" if stream.move_requested else type(e).__name__
                    if reason != "drain":
                        self._failed(old, f"stream: {reason}")
                    await self._release(stream)
                    if st.finished:
                        # Everything came but [DONE]: nothing to replay.
                        yield b"data: [DONE]\n\n"
                        return
                    if (
                        not migratable
                        or st.prompt_ids is None
                        or num_moves >= self.cfg.migration_limit
                    ):
                        yield _sse(
                            _stream_error(
                                f"replica {old.id} failed mid-stream ({reason})", "replica_failed"
                            )
                        )
                        yield b"data: [DONE]\n\n"
                        return
                    num_moves += 1
                    got = await self._continue(call, st, {old.id})
                    if isinstance(got, Response):
                        yield _sse(
                            _stream_error(
                                "no replica could continue the stream", "migration_failed"
                            )
                        )
                        yield b"data: [DONE]\n\n"
                        return
                    new_replica, new_resp, held = got
                    self.metrics.migrations.labels(old.id, new_replica.id, reason).inc()
                    self.metrics.migrated_tokens.inc(len(st.gen_ids))
                    logger.info(
                        "stream moved %s -> %s after %d tokens (%s)",
                        old.id,
                        new_replica.id,
                        len(st.gen_ids),
                        reason,
                    )
                    stream = _Stream(new_resp, new_replica)
                    new_replica.streams.add(stream)
                    if held:
                        yield _sse(st.text_chunk(held, chat))
                    cont = True
        finally:
            await self._release(stream)
            self.metrics.latency.labels(stream.replica.id, stream.replica.spec.version).observe(
                time.perf_counter() - call.t0
            )

    async def _continue(
        self, call: Call, st: _StreamState, exclude: set[str]
    ) -> tuple[Replica, httpx.Response, str] | Response:
        """Open the continuation on another replica: prompt + generated ids."""
        b = call.body or {}
        body: dict[str, Any] = {k: b[k] for k in _KEEP_FIELDS if k in b}
        assert st.prompt_ids is not None
        body["prompt"] = st.prompt_ids + st.gen_ids
        body["model"] = b.get("model")
        body["stream"] = True
        body["return_token_ids"] = True
        if b.get("stream_options"):
            body["stream_options"] = b["stream_options"]
        limit = b.get("max_completion_tokens") or b.get("max_tokens")
        if limit is None and call.path == "/v1/completions":
            limit = 16  # the completions API's default
        if limit is not None:
            body["max_tokens"] = max(1, int(limit) - len(st.gen_ids))
        if b.get("min_tokens"):
            body["min_tokens"] = max(0, int(b["min_tokens"]) - len(st.gen_ids))
        if body.get("model") is None:
            body.pop("model")
        got = await self._open_with_retries(call, body, "/v1/completions", set(exclude))
        if isinstance(got, Response):
            return got
        replica, resp = got
        held = await self._held_back(call, replica, st)
        return replica, resp, held

    async def _held_back(self, call: Call, replica: Replica, st: _StreamState) -> str:
        """Text of the generated ids the client has not seen (the old replica held it
        back, e.g. an incomplete character or a possible stop string)."""
        if not st.gen_ids:
            return ""
        try:
            r = await self.client.post(
                replica.url + "/detokenize",
                json={"tokens": st.gen_ids},
                headers={k: v for k, v in call.headers.items() if k == "authorization"},
                timeout=self.cfg.health_timeout_s,
            )
            full = r.json()["prompt"] if r.status_code == 200 else ""
        except (httpx.HTTPError, ValueError, KeyError):
            return ""
        full = full.rstrip("\ufffd")
        if full.startswith(st.text) and len(full) > len(st.text):
            return full[len(st.text) :]
        return ""


@dataclass(eq=False)
class _Stream:
    resp: httpx.Response
    replica: Replica
    move_requested: bool = False  # a drain asked this stream to move
    released: bool = False

    def move(self) -> None:
        """Planned drain: the relay stops reading this replica at its next event and
        replays the stream elsewhere (it closes the upstream response itself, so no
        other task touches the connection)."""
        self.move_requested = True


class _StreamState:
    """What the client has seen of a stream: ids, text, and the original envelope."""

    def __init__(self) -> None:
        self.prompt_ids: list[int] | None = None
        self.gen_ids: list[int] = []
        self.text = ""
        self.finished = False
        self.envelope: dict[str, Any] = {}
        self.num_prompt_tokens: int | None = None

    def observe(self, obj: dict, cont: bool) -> None:
        if not cont and not self.envelope:
            self.envelope = {k: obj.get(k) for k in ("id", "object", "created", "model")}
        for c in obj.get("choices", ()):
            if not cont and c.get("prompt_token_ids") is not None:
                self.prompt_ids = list(c["prompt_token_ids"])
            self.gen_ids.extend(c.get("token_ids") or ())
            delta = c.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else c.get("text")
            if isinstance(piece, str):
                self.text += piece
            if c.get("finish_reason") is not None:
                self.finished = True

    def text_chunk(self, text: str, chat: bool) -> dict:
        self.text += text
        return self._wrap(text, None, chat)

    def _wrap(self, text: str, finish: Any, chat: bool, extra: dict | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        if extra:
            choice.update(extra)
        return {**self.envelope, "choices": [choice]}

    def rewrite(self, obj: dict, chat: bool) -> dict | None:
        """A continuation event in the original stream's format."""
        usage = obj.get("usage")
        if usage and self.prompt_ids is not None:
            # The replayed ids were the original's output, not its prompt.
            n_prompt = len(self.prompt_ids)
            usage = {
                **usage,
                "prompt_tokens": n_prompt,
                "completion_tokens": usage.get("total_tokens", 0) - n_prompt,
            }
        if not obj.get("choices"):
            return {**self.envelope, "choices": [], "usage": usage} if usage else None
        c = obj["choices"][0]
        extra = {k: c[k] for k in ("stop_reason", "token_ids") if k in c}
        if not chat and c.get("logprobs") is not None:
            extra["logprobs"] = c["logprobs"]
        out = self._wrap(c.get("text", ""), c.get("finish_reason"), chat, extra)
        if usage:
            out["usage"] = usage
        return out


async def _events(resp: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON payloads of an SSE stream; None for ``[DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        try:
            yield json.loads(data)
        except ValueError:
            raise Broken("malformed event") from None


def _stream_error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _error_code(content: bytes) -> str | None:
    try:
        return json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _response_headers(resp: httpx.Response, replica: Replica) -> dict[str, str]:
    h = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE}
    h["x-kvasir-replica"] = replica.id
    return h
