"""Start-up, graceful drain and exit of ``kvasir serve``.

SIGTERM / SIGINT: /health turns 503 and new requests get 503 at once (the port stays
open so load balancers see it), in-flight requests run until ``--shutdown-timeout``,
the rest end with finish_reason "abort", then uvicorn stops, the engine core is shut
down and the process exits 0. A second signal skips the wait.

Engine death: /health turns 503, in-flight requests fail at once with an error, and
shortly after the server exits 1 so a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from contextlib import contextmanager

import uvicorn

from kvasir.engine.async_llm import AsyncLLM
from kvasir.entrypoints.cli import configure_logging
from kvasir.entrypoints.openai.api_server import build_app, check_chat_args, configure_chat
from kvasir.entrypoints.openai.middleware import ServerState
from kvasir.entrypoints.openai.serving_common import ServingContext
from kvasir.entrypoints.openai.serving_embedding import parse_matryoshka

logger = logging.getLogger("kvasir.serve")

# After the engine dies, keep answering (503) this long so health checks see it.
_DEAD_GRACE_S = 1.0
# After the drain has ended every request, how long handlers get to send their last bytes.
_FLUSH_TIMEOUT_S = 3.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM starts our drain instead of
    closing the listening socket at once."""

    @contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class Drainer:
    """Owns the shutdown sequence and the process exit code."""

    def __init__(
        self, state: ServerState, engine: AsyncLLM, server: uvicorn.Server, timeout: float
    ) -> None:
        self.state = state
        self.engine = engine
        self.server = server
        self.timeout = timeout
        self.exit_code = 0
        self._task: asyncio.Task | None = None
        self._admin_task: asyncio.Task | None = None
        self._hurry = asyncio.Event()

    def on_signal(self, sig: int) -> None:
        if self._task is not None:
            logger.warning("second signal: ending in-flight requests now")
            self._hurry.set()
            return
        logger.info("received %s: draining (up to %.0fs)", signal.Signals(sig).name, self.timeout)
        self.state.draining = True
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def on_engine_dead(self, err: BaseException) -> None:
        logger.error("%s; the server will exit", err)
        self.state.dead = True
        self.exit_code = 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._exit_after_dead())

    def admin_drain(self) -> None:
        """``POST /admin/drain``: the SIGTERM drain without the exit."""
        if self._task is not None or self._admin_task is not None:
            return
        logger.info("admin drain (up to %.0fs); the server keeps running", self.timeout)
        self.state.draining = True
        self._admin_task = asyncio.get_running_loop().create_task(self._drain(exit=False))

    def admin_undrain(self) -> None:
        if self._task is not None:
            return  # a signal's drain ends in an exit; it cannot be taken back
        if self._admin_task is not None:
            self._admin_task.cancel()
            self._admin_task = None
        logger.info("undrain: taking new requests again")
        self.state.draining = False

    async def _drain(self, exit: bool = True) -> None:
        deadline = time.monotonic() + self.timeout
        while self.engine.num_in_flight and time.monotonic() < deadline:
            if self._hurry.is_set():
                break
            await asyncio.sleep(0.05)
        left = self.engine.in_flight_request_ids()
        if left:
            logger.warning("shutdown timeout: aborting %d in-flight request(s)", len(left))
        for rid in left:
            self.engine.finish_aborted(rid)
        await self._wait_flushed(_FLUSH_TIMEOUT_S)
        if exit:
            self.server.should_exit = True

    async def _exit_after_dead(self) -> None:
        await asyncio.sleep(_DEAD_GRACE_S)
        await self._wait_flushed(_FLUSH_TIMEOUT_S)
        self.server.should_exit = True

    async def _wait_flushed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.state.num_active_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model: a taken port fails in a second, not after the
    load, and ``--port 0`` picks a free port we can print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _setup_logging(args: argparse.Namespace) -> None:
    # The CLI's configuration (a no-op when ``kvasir serve`` already ran it), plus the
    # per-request JSON lines, which go to stdout and only with --log-requests-json.
    configure_logging()
    req_logger = logging.getLogger("kvasir.requests")
    req_logger.propagate = False
    req_logger.setLevel(logging.INFO)
    if args.log_requests_json and not req_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the message is the JSON
        req_logger.addHandler(handler)


def _served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if not args.model:
        from kvasir.models.default import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return str(args.model)


async def serve(args: argparse.Namespace) -> int:
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.models.loader import load_tokenizer

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    from kvasir.metrics.gpu import GpuMetricsCollector
    from kvasir.observability.tracing import TracingConfig, init_tracing

    engine_args = EngineArgs.from_cli_args(args)
    check_chat_args(args)
    served = _served_model_name(args)
    if args.kv_cache_metrics and not 0 < args.kv_cache_metrics_sample <= 1:
        raise ValueError(
            f"--kv-cache-metrics-sample must be in (0, 1], got {args.kv_cache_metrics_sample}"
        )
    parse_matryoshka(args.matryoshka_dimensions)  # a bad value fails before the model loads
    if args.responses_store_size < 0:
        raise ValueError(f"--responses-store-size must be >= 0, got {args.responses_store_size}")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    if args.limit_concurrency < 1:
        raise ValueError(f"--limit-concurrency must be >= 1, got {args.limit_concurrency}")
    if args.max_tenant_labels < 1:
        raise ValueError(f"--max-tenant-labels must be >= 1, got {args.max_tenant_labels}")
    if args.gpu_metrics_interval < 0:
        raise ValueError(f"--gpu-metrics-interval must be >= 0, got {args.gpu_metrics_interval}")
    # Before the model loads: a missing OpenTelemetry package is a start-up error.
    tracing = init_tracing(
        TracingConfig.from_flags(
            args.otlp_traces_endpoint, args.otlp_traces_protocol, args.otlp_service_name
        )
    )
    guard_config = None
    if args.guard_config:
        from kvasir.guard.pipeline import GuardConfig

        guard_config = GuardConfig.load(args.guard_config)  # a bad file fails here
    tenant_registry = None
    if args.api_keys_file:
        from kvasir.security.tenants import TenantRegistry

        tenant_registry = TenantRegistry(args.api_keys_file)  # a bad file fails here
        args.enable_tenant_metrics = True
    engine_args.served_model_name = served
    config = engine_args.create_engine_config()
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    scheme = "https" if args.ssl_certfile else "http"
    logger.info("listening on %s://%s:%s (loading %s ...)", scheme, host, port, served)
    tokenizer = load_tokenizer(config.model_config)
    engine = await AsyncLLM.create(
        config,
        tokenizer,
        log_requests_json=args.log_requests_json,
        served_model_name=served,
        tracing=tracing,
        tenant_metrics=args.enable_tenant_metrics,
        max_tenant_labels=args.max_tenant_labels,
        kv_cache_metrics_sample=args.kv_cache_metrics_sample if args.kv_cache_metrics else 0.0,
        slo_ttft_s=args.slo_ttft_ms / 1000.0,
        slo_tpot_s=args.slo_tpot_ms / 1000.0,
    )
    gpu_metrics = None
    if args.gpu_metrics_interval > 0:
        gpu_metrics = GpuMetricsCollector(served, args.gpu_metrics_interval)
        if not gpu_metrics.start(engine.metrics.registry):
            gpu_metrics = None
    state = ServerState(
        api_key=args.api_key or None,
        max_request_body_bytes=args.max_request_body_bytes,
        max_header_bytes=args.max_header_bytes,
        extra={
            "started": int(time.time()),
            "tenant_header": args.tenant_header,
            "pooling_type": args.pooling_type,
            "matryoshka_dimensions": parse_matryoshka(args.matryoshka_dimensions),
            "responses_store_size": args.responses_store_size,
            "allow_runtime_lora_updating": args.allow_runtime_lora_updating,
            "allowed_origins": [
                o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()
            ],
            "tls": bool(args.ssl_certfile),
        },
    )
    ctx = ServingContext(engine, served, args.retry_after)
    configure_chat(ctx, args)
    if args.guard_config:
        from kvasir.guard.pipeline import GuardConfig, GuardMetrics, Guards

        ctx.guards = Guards(guard_config, GuardMetrics(engine.metrics.registry, served))
    if tenant_registry is not None:
        from kvasir.entrypoints.openai.tenancy import Tenancy

        ctx.tenancy = Tenancy(
            tenant_registry, engine.metrics.registry, served, args.max_tenant_labels
        )
        state.tenants = tenant_registry
        state.tenant_label = engine.metrics.http.tenant_label
        logger.info("tenants from %s: %d", args.api_keys_file, len(tenant_registry.tenants))
    app = build_app(state, ctx)
    uv_config = uvicorn.Config(
        app,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_graceful_shutdown=5,
        lifespan="off",
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=args.max_header_bytes,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        server_header=False,
    )
    server = _Server(uv_config)
    drainer = Drainer(state, engine, server, args.shutdown_timeout)
    engine.add_dead_callback(drainer.on_engine_dead)
    state.extra["drain"] = drainer.admin_drain
    state.extra["undrain"] = drainer.admin_undrain
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drainer.on_signal, sig)
    if ctx.tenancy is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_tenants, ctx)
    core_pid = engine.core.pid if engine.core else "?"
    logger.info(
        "serving %s on %s://%s:%s (engine core pid %s)", served, scheme, host, port, core_pid
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await engine.shutdown()
        if gpu_metrics is not None:
            gpu_metrics.stop()
        if tracing is not None:
            tracing.provider.shutdown()  # flushes the spans still batched
        sock.close()
    logger.info("exit %d", drainer.exit_code)
    return drainer.exit_code


def _reload_tenants(ctx: ServingContext) -> None:
    assert ctx.tenancy is not None
    try:
        ctx.tenancy.reload()
    except ValueError as e:
        logger.error("SIGHUP: %s; the old tenants keep serving", e)


def run_server(args: argparse.Namespace) -> int:
    _setup_logging(args)
    try:
        return asyncio.run(serve(args))
    except (RuntimeError, OSError, ValueError) as e:
        # Start-up failures (model load, port in use, bad flag) are one clear line.
        print(f"kvasir serve: error: {e}", file=sys.stderr, flush=True)
        return 1
