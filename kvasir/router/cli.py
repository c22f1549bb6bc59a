"""``kvasir router``: a cache- and load-aware router over ``kvasir serve`` replicas.

    kvasir router --replica http://10.0.0.1:8000 --replica http://10.0.0.2:8000 \\
        --policy cache_aware --admin-key $KEY [--config router.toml] [--etcd URL]

Flags override the config file's values. SIGHUP re-reads ``--config`` (a bad file is
refused and the old config kept); SIGTERM stops after in-flight requests finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from contextlib import contextmanager

import uvicorn

from kvasir.router.config import POLICIES, ConfigError, RouterConfig

logger = logging.getLogger("kvasir.router")

# flag -> RouterConfig field (flags left unset keep the file's or the default value)
_FLAG_FIELDS = {
    "policy": "policy",
    "cache_threshold": "cache_threshold",
    "balance_abs_threshold": "balance_abs_threshold",
    "balance_rel_threshold": "balance_rel_threshold",
    "max_tree_size": "tree_max_chars",
    "tree_max_age": "tree_max_age_s",
    "session_header": "session_header",
    "health_interval": "health_interval_s",
    "health_timeout": "health_timeout_s",
    "canary_interval": "canary_interval_s",
    "max_retries": "max_retries",
    "migration_limit": "migration_limit",
    "hedge_after": "hedge_after_ms",
    "request_timeout": "request_timeout_s",
    "retry_after": "retry_after_s",
    "eject_base": "eject_base_s",
    "eject_failures": "eject_consecutive_failures",
}


def add_router_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="cache- and load-aware router over kvasir serve replicas")
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="[ID=]URL",
        help="a replica's base URL (repeatable; ids default to r0, r1, ...)",
    )
    p.add_argument(
        "--spare",
        action="append",
        default=[],
        metavar="[ID=]URL",
        help="an N+1 hot spare: takes traffic only while another is ejected",
    )
    p.add_argument(
        "--replica-dns",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="every address HOST resolves to is a replica, re-resolved each "
        "health round (a Kubernetes headless Service)",
    )
    p.add_argument("--config", default=None, help="TOML config (replicas, models, versions)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080, help="0: any free port")
    p.add_argument(
        "--admin-key",
        default=os.environ.get("KVASIR_ROUTER_ADMIN_KEY"),
        help="key of the admin API (default $KVASIR_ROUTER_ADMIN_KEY; unset: off)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("KVASIR_API_KEY"),
        help="key the router's own health canaries send to replicas",
    )
    p.add_argument("--policy", choices=POLICIES, default=None)
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        help="cache-aware: min fraction of the prompt matched to follow the cache",
    )
    p.add_argument("--balance-abs-threshold", type=int, default=None)
    p.add_argument("--balance-rel-threshold", type=float, default=None)
    p.add_argument(
        "--max-tree-size",
        type=int,
        default=None,
        help="cache-aware: characters remembered per replica",
    )
    p.add_argument("--tree-max-age", type=float, default=None, help="seconds")
    p.add_argument("--session-header", default=None, help="session-affinity header")
    p.add_argument("--health-interval", type=float, default=None, help="seconds")
    p.add_argument("--health-timeout", type=float, default=None, help="seconds")
    p.add_argument(
        "--canary-interval",
        type=float,
        default=None,
        help="seconds between one-token canary completions (0: off)",
    )
    p.add_argument(
        "--eject-base",
        type=float,
        default=None,
        help="first ejection back-off in seconds (doubles each time)",
    )
    p.add_argument(
        "--eject-failures", type=int, default=None, help="consecutive failures that eject a replica"
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="retries on other replicas before the first byte",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=None,
        help="times one stream may move to another replica (0: never)",
    )
    p.add_argument(
        "--hedge-after",
        type=float,
        default=None,
        metavar="MS",
        help="send a duplicate if no first byte within MS (0: off)",
    )
    p.add_argument("--request-timeout", type=float, default=None, help="seconds")
    p.add_argument(
        "--retry-after",
        type=int,
        default=None,
        help="Retry-After seconds of 503 'no healthy replica'",
    )
    p.add_argument(
        "--etcd",
        default=None,
        metavar="URL",
        help="share cordons, drains, ejections and config through etcd",
    )
    p.add_argument("--etcd-prefix", default="/kvasir/router")
    p.add_argument("--uvicorn-log-level", default="warning")
    p.set_defaults(func=run_router)


def make_config(args: argparse.Namespace) -> tuple[RouterConfig, str | None, dict]:
    overrides = {
        field: getattr(args, flag)
        for flag, field in _FLAG_FIELDS.items()
        if getattr(args, flag) is not None
    }
    text = None
    if args.config:
        with open(args.config) as f:
            text = f.read()
        try:
            cfg = RouterConfig.from_toml(text, **overrides)
        except ConfigError as e:
            raise ValueError(f"{args.config}: {e}") from None
    else:
        cfg = RouterConfig(**overrides)
    from dataclasses import replace

    from kvasir.router.config import ReplicaSpec

    cfg = cfg.with_replicas(args.replica)
    spares = []
    for i, u in enumerate(args.spare):
        rid, sep, url = u.partition("=")
        if not sep or rid.startswith("http"):
            rid, url = f"spare{i}", u
        spares.append(ReplicaSpec(rid, url.rstrip("/"), spare=True))
    cfg = replace(cfg, replicas=cfg.replicas + tuple(spares))
    if not cfg.replicas and not args.etcd and not args.replica_dns:
        raise ValueError("no replicas: give --replica URL, --replica-dns HOST:PORT or a --config")
    return cfg, text, overrides


def _dns_targets(items: list[str]) -> list[tuple[str, int]]:
    out = []
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"--replica-dns {item!r}: expected HOST:PORT")
        out.append((host, int(port)))
    return out


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (it would re-raise SIGTERM at exit):
    SIGTERM stops accepting, lets in-flight requests finish, and exits 0."""

    @contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _stop(server: uvicorn.Server, sig: int) -> None:
    if server.should_exit:
        server.force_exit = True  # a second signal: stop now
    logger.info("received %s: stopping after in-flight requests", signal.Signals(sig).name)
    server.should_exit = True


async def serve(args: argparse.Namespace) -> int:
    from kvasir.router.app import Router, build_app

    cfg, text, overrides = make_config(args)
    file_replicas = set(RouterConfig.from_toml(text).replicas) if text else set()
    router = Router(
        cfg,
        admin_key=args.admin_key or None,
        api_key=args.api_key or None,
        etcd_url=args.etcd,
        etcd_prefix=args.etcd_prefix,
        config_text=text,
        config_path=args.config,
        flag_overrides=overrides,
        flag_replicas=tuple(r for r in cfg.replicas if r not in file_replicas),
    )
    router.dns = _dns_targets(args.replica_dns)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    host, port = sock.getsockname()[:2]
    await router.start()
    server = _Server(
        uvicorn.Config(
            build_app(router),
            log_level=args.uvicorn_log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=30,
        )
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, router.reload_file)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, server, sig)
    logger.info(
        "router listening on http://%s:%s (%d replicas, policy %s)",
        host,
        port,
        len(cfg.replicas),
        router.fleet.policy.name,
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await router.stop()
        sock.close()
    return 0


def run_router(args: argparse.Namespace) -> int:
    from kvasir.entrypoints.cli import configure_logging

    configure_logging()
    logging.getLogger("kvasir.router").setLevel(logging.INFO)
    return asyncio.run(serve(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m kvasir.router.cli`` (what ``kvasir router`` runs, without importing
    the engine: the router needs no torch)."""
    parser = argparse.ArgumentParser(prog="kvasir")
    add_router_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["router", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run_router(args)
    except (ValueError, OSError) as e:
        print(f"kvasir router: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
