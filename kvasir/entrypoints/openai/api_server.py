"""The OpenAI-compatible HTTP server (FastAPI + uvicorn, one asyncio loop).

``kvasir serve [MODEL]`` -> ``run_server``: spawn the engine core, then serve
``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/tokenize``,
``/detokenize``, ``/health``, ``/metrics`` and ``/version``. SIGTERM drains (see
``kvasir.entrypoints.openai.launcher``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response

from kvasir import __version__
from kvasir.engine.async_llm import AsyncLLM
from kvasir.entrypoints.openai.errors import (
    OpenAIError,
    bad_request,
    from_value_error,
    install_exception_handlers,
)
from kvasir.entrypoints.openai.middleware import (
    DOC_PATHS,
    OPEN_PATHS,
    SecurityHeadersMiddleware,
    ServerMiddleware,
    ServerState,
)
from kvasir.entrypoints.openai.observability import ObservabilityMiddleware
from kvasir.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from kvasir.entrypoints.openai.serving_chat import OpenAIServingChat, messages_to_dicts
from kvasir.entrypoints.openai.serving_common import PARAM_NAMES, ServingContext
from kvasir.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvasir.entrypoints.openai.serving_embedding import EmbeddingRequest, OpenAIServingEmbedding
from kvasir.entrypoints.openai.serving_lora import add_lora_routes
from kvasir.entrypoints.openai.serving_responses import OpenAIServingResponses, ResponsesRequest
from kvasir.metrics.prometheus import CONTENT_TYPE

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Invalid parameter (named in error.param), malformed JSON or a non-object body",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Request body over --max-request-body-bytes",
        403: "The tenant may not use this model, or this key may not call /admin",
        429: "Waiting queue full (--max-queued-requests) or a tenant rate/concurrency limit "
        "(error.code names it); see the Retry-After header",
        503: "Server draining (SIGTERM or POST /admin/drain) or engine dead",
    }.items()
}


def _sse_doc(model: type) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": f"With stream=true: `data: <{model.__name__}>` events, then `data: [DONE]`.",
                    }
                }
            }
        }
    }


class WatermarkDetectRequest(BaseModel):
    text: str | None = Field(None, max_length=4_000_000)
    tokens: list[int] | None = Field(None, max_length=1_000_000)


def build_app(state: ServerState, ctx: ServingContext) -> FastAPI:
    """The FastAPI app over a running ``AsyncLLM`` (held by ``ctx``)."""
    app = FastAPI(title="kvasir OpenAI-compatible API", version=__version__)
    install_exception_handlers(app)
    completion = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)
    engine: AsyncLLM = ctx.engine

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse, "description": "draining or dead"}},
    )
    async def health() -> Response:
        if state.dead or engine.is_dead:
            return OpenAIError(
                503, "The engine is dead.", "service_unavailable_error", None, "engine_dead"
            ).to_response()
        if state.draining:
            err = OpenAIError(
                503,
                "The server is shutting down.",
                "service_unavailable_error",
                None,
                "server_draining",
            )
            # ``draining`` beside the error object: routers stop sending new work at once.
            return JSONResponse({**err.to_dict(), **_load(), "draining": True}, status_code=503)
        return JSONResponse({"status": "ok", "draining": False, **_load()})

    def _load() -> dict:
        # What a router's power-of-two and cache-aware policies balance on.
        reg = engine.metrics.registry
        labels = {"model_name": ctx.served_model_name}
        return {
            "num_in_flight": engine.num_in_flight,
            "num_requests_running": reg.get_sample_value("kvasir:num_requests_running", labels),
            "num_requests_waiting": reg.get_sample_value("kvasir:num_requests_waiting", labels),
            "kv_cache_usage_perc": reg.get_sample_value("kvasir:kv_cache_usage_perc", labels),
        }

    @app.post("/admin/drain")
    async def admin_drain() -> dict:
        """What SIGTERM does (stop taking new requests, let in-flight ones finish up to
        --shutdown-timeout, abort the rest) without exiting. ``safe_to_stop`` turns true
        once nothing is in flight; ``POST /admin/undrain`` takes requests again."""
        start = state.extra.get("drain")
        if start is not None and not state.draining:
            start()
        state.draining = True
        return _drain_status()

    @app.get("/admin/drain")
    async def admin_drain_status() -> dict:
        return _drain_status()

    @app.post("/admin/undrain")
    async def admin_undrain() -> dict:
        cancel = state.extra.get("undrain")
        if cancel is not None:
            cancel()
        state.draining = False
        return _drain_status()

    def _drain_status() -> dict:
        n = engine.num_in_flight
        return {
            "draining": state.draining,
            "num_in_flight": n,
            "safe_to_stop": state.draining and n == 0,
        }

    @app.post("/v1/watermark/detect", responses=_ERRORS)
    async def watermark_detect(request: WatermarkDetectRequest) -> dict:
        """Score a text (or token ids) against this server's --watermark-key: one-sided
        z-test of its green tokens (``kvasir.security.watermark``)."""
        cfg = engine.config
        if cfg.watermark_key is None:
            raise bad_request("the server has no --watermark-key", None, "no_watermark")
        from kvasir.security.watermark import Watermark, WatermarkParams

        if (request.text is None) == (request.tokens is None):
            raise bad_request("exactly one of text and tokens is required", "text")
        vocab = engine.model_info.vocab_size
        if request.tokens is not None:
            ids = request.tokens
            for i, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise bad_request(f"token id {t} is out of vocabulary", f"tokens[{i}]")
        else:
            if ctx.tokenizer is None:
                raise bad_request("this model has no tokenizer: send tokens", "text")
            ids = list(ctx.tokenizer.encode(request.text, add_special_tokens=False))
        wm = Watermark(
            WatermarkParams(
                cfg.watermark_key, cfg.watermark_gamma, cfg.watermark_delta,
                cfg.watermark_context,
            )
        )  # fmt: skip
        return wm.detect(ids, vocab)

    @app.post("/admin/tenants/reload", responses=_ERRORS)
    async def admin_tenants_reload() -> dict:
        """Re-read --api-keys-file (what SIGHUP does): new keys and limits apply to the
        next request; bucket levels and running counts of kept tenants carry over. A bad
        file is a 400 and the old tenants keep serving."""
        if ctx.tenancy is None:
            raise bad_request("the server has no --api-keys-file", None, "no_tenants")
        try:
            names = ctx.tenancy.reload()
        except ValueError as e:
            raise bad_request(str(e), None, "invalid_api_keys_file") from None
        return {"tenants": names}

    @app.get("/version", response_model=VersionResponse)
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": ctx.served_model_name,
                    "object": "model",
                    "created": state.extra["started"],
                    "owned_by": "kvasir",
                    "root": engine.config.model_config.model,
                    "max_model_len": ctx.max_model_len,
                },
                *(ctx.lora.model_cards(state.extra["started"]) if ctx.lora is not None else []),
            ],
        }

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**_ERRORS, **_sse_doc(CompletionStreamResponse)},
    )
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create_completion(request, raw_request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_ERRORS, **_sse_doc(ChatCompletionStreamResponse)},
    )
    async def create_chat_completion(
        request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    _add_embedding_and_responses_routes(app, state, ctx)
    add_lora_routes(app, ctx, bool(state.extra.get("allow_runtime_lora_updating")))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(request: TokenizeRequest) -> dict:
        ctx.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("exactly one of prompt and messages is required", "prompt")
        if request.messages is not None:
            try:
                ids = engine.input_processor.apply_chat_template(
                    messages_to_dicts(request.messages),
                    add_generation_prompt=request.add_generation_prompt,
                )
            except OpenAIError:
                raise
            except Exception as e:  # template errors are the caller's input
                raise bad_request(f"could not apply the chat template: {e}", "messages") from None
        else:
            assert request.prompt is not None
            try:
                _, ids = engine.input_processor.tokenize(request.prompt)
            except ValueError as e:
                raise from_value_error(e, PARAM_NAMES) from None
        return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(request: DetokenizeRequest) -> dict:
        ctx.check_model(request.model)
        vocab = engine.model_info.vocab_size
        for i, t in enumerate(request.tokens):
            if not 0 <= t < vocab:
                raise bad_request(f"token id {t} is out of vocabulary [0, {vocab})", f"tokens[{i}]")
        if ctx.tokenizer is None:
            raise bad_request("this model has no tokenizer", "tokens")
        return {"prompt": ctx.tokenizer.decode(request.tokens)}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            if state.api_key is not None or state.tenants is not None:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                for path, ops in schema.get("paths", {}).items():
                    if path not in OPEN_PATHS and path not in DOC_PATHS:
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(ServerMiddleware, state=state)
    origins = state.extra.get("allowed_origins")
    if origins:  # CORS is off unless the operator names the origins
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "x-api-key"],
        )
    app.add_middleware(SecurityHeadersMiddleware, tls=bool(state.extra.get("tls")))
    # Outermost: sees (and counts) the 401/413/503 answers of ServerMiddleware too.
    app.add_middleware(
        ObservabilityMiddleware,
        http_metrics=engine.metrics.http,
        tracing=engine.tracing,
        model_name=ctx.served_model_name,
        tenant_header=state.extra.get("tenant_header", "x-tenant-id"),
    )
    return app


def _add_embedding_and_responses_routes(
    app: FastAPI, state: ServerState, ctx: ServingContext
) -> None:
    """``/v1/embeddings`` and ``/v1/responses`` (settings from ``state.extra``)."""
    embedding = OpenAIServingEmbedding(
        ctx, state.extra.get("pooling_type", "LAST"), state.extra.get("matryoshka_dimensions")
    )

    @app.post("/v1/embeddings", responses=_ERRORS)
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
        return await embedding.create_embedding(request, raw_request)

    responses = OpenAIServingResponses(ctx, state.extra.get("responses_store_size", 1000))

    @app.post("/v1/responses", responses=_ERRORS)
    async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
        return await responses.create_response(request, raw_request)

    @app.get("/v1/responses/{response_id}", responses=_ERRORS)
    async def retrieve_response(response_id: str) -> dict:
        return responses.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}", responses=_ERRORS)
    async def delete_response(response_id: str) -> dict:
        return responses.delete(response_id)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``kvasir serve`` flags: the server's (vLLM names) plus every engine flag."""
    from kvasir.engine.arg_utils import EngineArgs

    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="model to serve (same as --model; default: SmolLM2-135M-Instruct)",
    )
    g = parser.add_argument_group("server")
    g.add_argument("--host", type=str, default="0.0.0.0", help="address to bind")
    g.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    g.add_argument(
        "--api-key",
        type=str,
        default=os.environ.get("KVASIR_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every inference path "
        "(default: $KVASIR_API_KEY)",
    )
    g.add_argument(
        "--guard-config",
        default=None,
        help="JSON or YAML guard pipeline: input injection detection, output PII / "
        "blocklist redaction (see kvasir/guard/pipeline.py, docs/security.md)",
    )
    g.add_argument(
        "--api-keys-file",
        default=None,
        help="JSON or YAML file of tenants: their API keys (plain or sha256:<hex>) and "
        "limits (requests/tokens per minute, concurrency, max_tokens, n, logprobs, models); "
        "reloaded on SIGHUP and POST /admin/tenants/reload; see docs/security.md",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may take to finish before "
        "they end with finish_reason 'abort'",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=8 * 2**20,
        help="larger request bodies get 413",
    )
    g.add_argument(
        "--limit-concurrency",
        type=int,
        default=1000,
        help="open connections at most (uvicorn answers 503 beyond; streams hold one each)",
    )
    g.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (slowloris)",
    )
    g.add_argument(
        "--max-header-bytes",
        type=int,
        default=64 * 1024,
        help="a request head (all headers) larger than this gets 431",
    )
    g.add_argument(
        "--allowed-origins",
        default=None,
        help="comma-separated origins allowed by CORS (default: CORS off)",
    )
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    g.add_argument("--ssl-keyfile", default=None, help="the private key of --ssl-certfile")
    g.add_argument(
        "--retry-after", type=int, default=1, help="Retry-After seconds sent with 429 (queue full)"
    )
    g.add_argument(
        "--log-requests-json",
        action="store_true",
        help="one JSON log line per finished request with its timings",
    )
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="with --enable-lora: POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    g.add_argument(
        "--pooling-type",
        default="LAST",
        type=str.upper,
        choices=["LAST", "MEAN"],
        help="/v1/embeddings: pool the last token's final hidden state or the mean over the input",
    )
    g.add_argument(
        "--matryoshka-dimensions",
        default=None,
        help="/v1/embeddings: the model is Matryoshka-trained and 'dimensions' may truncate "
        "to these sizes (comma-separated, or 'any'); without it 'dimensions' is refused",
    )
    g.add_argument(
        "--responses-store-size",
        type=int,
        default=1000,
        help="/v1/responses: responses kept in memory for previous_response_id (per "
        "server process, oldest dropped first; 0: none kept)",
    )
    _add_observability_args(parser)
    _add_chat_args(parser)
    g.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    EngineArgs.add_cli_args(parser)
    return parser


def _add_chat_args(parser: argparse.ArgumentParser) -> None:
    from kvasir.entrypoints.openai.reasoning_parsers import REASONING_PARSERS
    from kvasir.entrypoints.openai.tool_parsers import TOOL_PARSERS

    c = parser.add_argument_group("tool calling and reasoning")
    c.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='parse the model\'s own tool calls (tool_choice "auto"); needs --tool-call-parser',
    )
    c.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="the model's tool-call format: hermes (Qwen2/3, SmolLM2), llama3_json, mistral",
    )
    c.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render a request's own chat_template (sandboxed, with limits); off: 400",
    )
    c.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="tokenise special tokens typed inside message content (<|im_start|>...) as "
        "control tokens; off: they are plain text",
    )
    c.add_argument(
        "--logprobs-precision",
        type=int,
        default=None,
        help="round every returned logprob to this many decimal places (limits extraction)",
    )
    c.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split <think>...</think> into reasoning_content",
    )


def check_chat_args(args: argparse.Namespace) -> None:
    if getattr(args, "enable_auto_tool_choice", False) and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


def configure_chat(ctx: ServingContext, args: argparse.Namespace) -> None:
    """Copy the tool-calling and reasoning flags onto the serving context."""
    check_chat_args(args)
    auto = bool(getattr(args, "enable_auto_tool_choice", False))
    parser = getattr(args, "tool_call_parser", None)
    ctx.enable_auto_tool_choice = auto
    ctx.tool_call_parser = parser
    ctx.reasoning_parser = getattr(args, "reasoning_parser", None)
    ctx.trust_request_chat_template = bool(getattr(args, "trust_request_chat_template", False))
    ctx.engine.input_processor.allow_special_tokens_in_content = bool(
        getattr(args, "allow_special_tokens_in_content", False)
    )
    precision = getattr(args, "logprobs_precision", None)
    if precision is not None and not 0 <= precision <= 16:
        raise ValueError(f"--logprobs-precision must be in [0, 16], got {precision}")
    ctx.logprobs_precision = precision


def _add_observability_args(parser: argparse.ArgumentParser) -> None:
    o = parser.add_argument_group("observability")
    o.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="send OpenTelemetry traces over OTLP to this URL (default: "
        "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT; none: off)",
    )
    o.add_argument(
        "--otlp-traces-protocol",
        default=None,
        choices=["grpc", "http/protobuf"],
        help="OTLP transport (default: $OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "
        "$OTEL_EXPORTER_OTLP_PROTOCOL or grpc)",
    )
    o.add_argument(
        "--otlp-service-name",
        default=None,
        help="service.name of the traces (default: $OTEL_SERVICE_NAME or kvasir)",
    )
    o.add_argument(
        "--enable-tenant-metrics",
        action="store_true",
        help="count requests and tokens per tenant (the --tenant-header value, else a "
        "digest of the API key the request carried)",
    )
    o.add_argument("--tenant-header", default="x-tenant-id", help="header naming the tenant")
    o.add_argument(
        "--max-tenant-labels",
        type=int,
        default=100,
        help="distinct tenant labels at most; later tenants count as __other__",
    )
    o.add_argument(
        "--kv-cache-metrics",
        action="store_true",
        help="sampled KV-block lifetime, idle-before-evict and reuse-gap histograms",
    )
    o.add_argument(
        "--kv-cache-metrics-sample",
        type=float,
        default=0.01,
        help="fraction of KV blocks sampled with --kv-cache-metrics",
    )
    o.add_argument(
        "--gpu-metrics-interval",
        type=float,
        default=5.0,
        help="seconds between NVML samples of kvasir:gpu_* (0: off)",
    )
    o.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=1000.0,
        help="TTFT threshold of kvasir:request_goodput",
    )
    o.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=100.0,
        help="TPOT threshold of kvasir:request_goodput",
    )


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 after the drain) or until the engine dies
    (exit 1). Returns the exit code."""
    from kvasir.entrypoints.openai.launcher import run_server as _run

    return _run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvasir serve")
    add_cli_args(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
