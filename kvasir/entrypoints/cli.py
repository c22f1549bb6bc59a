"""``kvasir`` command line: generate, chat, serve, router, bench, plan, top, eval, quantize.

The command line decides what reaches the terminal: results (generated text, benchmark
tables and their JSON summary line) are printed to stdout by each command; messages to
the operator (the KV-cache summary, "listening on", drain and errors) are logged by
kvasir's modules and ``configure_logging`` sends them to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a GPU is.",
    "Give me three tips for learning to cook.",
]


def configure_logging(level: int = logging.INFO) -> None:
    """Send kvasir's log records at ``level`` and above, and everyone else's warnings,
    to stderr. Idempotent: a second call (``kvasir serve`` reaches the launcher through
    ``main``) changes nothing. Other libraries stay at WARNING so that, e.g., httpx does
    not log every request of ``kvasir bench serve``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    logging.getLogger("kvasir").setLevel(level)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="per-request sampling seed (--seed seeds the engine)",
    )
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None)


def _sampling_params(args: argparse.Namespace):  # -> SamplingParams
    from kvasir.sampling_params import SamplingParams

    return SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
        min_tokens=args.min_tokens,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def _engine(args: argparse.Namespace):  # -> LLM
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.entrypoints.llm import LLM

    ea = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(ea).items() if k != "model"}
    return LLM(model=ea.model, **kwargs)


def cmd_generate(args: argparse.Namespace) -> int:
    sp = _sampling_params(args)
    llm = _engine(args)
    prompts = args.prompt or DEMO_PROMPTS
    use_chat = (
        not args.raw
        and llm.get_tokenizer() is not None
        and getattr(llm.get_tokenizer(), "chat_template", None)
    )
    t0 = time.perf_counter()
    if use_chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], sp, use_tqdm=False)
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    total_out = 0
    for prompt, out in zip(prompts, outs):
        print(f"\n### {prompt}")
        for c in out.outputs:
            m = out.metrics
            ttft = (m.first_token_time - m.arrival_time) if m and m.first_token_time else 0.0
            dur = (m.finished_time - m.arrival_time) if m and m.finished_time else elapsed
            print(c.text.strip())
            print(
                f"  [{len(c.token_ids)} tokens, finish={c.finish_reason}, "
                f"ttft {ttft * 1000:.0f} ms, {len(c.token_ids) / max(dur, 1e-9):.1f} tok/s]"
            )
            total_out += len(c.token_ids)
    print(
        f"\n{len(prompts)} prompts, {total_out} output tokens in {elapsed:.2f} s "
        f"= {total_out / elapsed:.1f} output tok/s (batched)"
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvasir.sampling_params import RequestOutputKind

    sp = _sampling_params(args)
    sp.output_kind = RequestOutputKind.DELTA
    llm = _engine(args)
    engine = llm.llm_engine
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("kvasir chat: type a message, Ctrl-D or /exit to quit.", flush=True)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.input_processor.apply_chat_template(history)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, ids, sp)
        reply = []
        t0 = time.perf_counter()
        ntok = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                for c in out.outputs:
                    sys.stdout.write(c.text)
                    sys.stdout.flush()
                    reply.append(c.text)
                    ntok += len(c.token_ids)
        dt = time.perf_counter() - t0
        print(f"\n  [{ntok} tokens, {ntok / max(dt, 1e-9):.1f} tok/s]", flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    from kvasir import __version__
    from kvasir.engine.arg_utils import EngineArgs

    parser = argparse.ArgumentParser(
        prog="kvasir", description="kvasir: a small, fast LLM inference engine"
    )
    parser.add_argument("--version", action="version", version=f"kvasir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate answers to prompts (default: demo prompts)")
    g.add_argument("prompt", nargs="*", help="prompts (default: a few demo questions)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    EngineArgs.add_cli_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat, streaming tokens as they come")
    c.add_argument("--system", type=str, default=None, help="system prompt")
    EngineArgs.add_cli_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible server")
    try:
        from kvasir.entrypoints.openai import api_server

        api_server.add_cli_args(s)
        s.set_defaults(func=api_server.run_server)
    except ImportError as e:  # pragma: no cover - server dependencies missing
        msg = f"kvasir serve is unavailable: {e!r} (pip install fastapi uvicorn pyzmq)"
        s.set_defaults(func=lambda a: (print(msg, file=sys.stderr), 2)[1])

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    for name in ("latency", "throughput", "serve"):
        try:
            mod = __import__(f"kvasir.bench.{name}", fromlist=["add_cli_args", "main"])
        except ImportError as e:  # pragma: no cover - optional dependencies missing
            logger.warning("kvasir bench %s unavailable: %r", name, e)
            continue
        bp = bsub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        mod.add_cli_args(bp)
        bp.set_defaults(func=mod.main)

    from kvasir.spec_decode.train import add_train_draft_parser

    add_train_draft_parser(sub)

    from kvasir.plan.cli import add_plan_parser

    add_plan_parser(sub)

    from kvasir.observability.top import add_top_parser

    add_top_parser(sub)

    from kvasir.conformance.runner import add_conformance_parser

    add_conformance_parser(sub)
    add_eval_parser(sub)

    from kvasir.quantization.writer import add_quantize_parser

    add_quantize_parser(sub)
    _add_router_parser(sub)
    _add_watermark_parser(sub)

    from kvasir.kernels.tune_cli import add_tune_parser

    add_tune_parser(sub)
    return parser


# ``kvasir eval <name>``: module, help. Each module has ``add_cli_args(parser)`` and
# ``main(args) -> int``; a new evaluation adds one line here.
EVAL_COMMANDS: dict[str, tuple[str, str]] = {
    "perplexity": ("kvasir.eval.perplexity", "sliding-window perplexity of a text file"),
    "lm-eval": ("kvasir.eval.lm_eval", "EleutherAI's lm-evaluation-harness against a server"),
}


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="model-quality evaluations through the engine")
    esub = e.add_subparsers(dest="eval_command", required=True)
    for name, (module, help_text) in EVAL_COMMANDS.items():
        mod = __import__(module, fromlist=["add_cli_args", "main"])
        ep = esub.add_parser(name, help=help_text, description=mod.__doc__)
        mod.add_cli_args(ep)
        ep.set_defaults(func=mod.main)


def _add_watermark_parser(sub: argparse._SubParsersAction) -> None:
    from kvasir.security.watermark import add_cli_args

    add_cli_args(sub.add_parser("watermark", help="watermark detection (kvasir.security)"))


def _add_router_parser(sub: argparse._SubParsersAction) -> None:
    """``kvasir router``: see kvasir/router/cli.py."""
    try:
        from kvasir.router.cli import add_router_parser
    except ImportError as e:  # pragma: no cover - server dependencies missing
        logger.warning("kvasir router unavailable: %r", e)
        return
    add_router_parser(sub)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvasir: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
