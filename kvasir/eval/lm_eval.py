"""``kvasir eval lm-eval``: EleutherAI's lm-evaluation-harness against a kvasir server.

The harness talks to the server over HTTP through its ``local-completions`` model
(loglikelihood tasks: ``echo`` + ``logprobs`` on ``/v1/completions``, prompts sent as
token ids from the same tokenizer; and generation) or ``local-chat-completions``
(``--chat``: generation only, the server applies the chat template). ``--base-url``
points at a running server; ``--model`` starts ``kvasir serve MODEL`` with
``--serve-args`` itself, and ``--compare ARGS`` runs the same tasks against a second
configuration (a quantised or speculative one, say) and prints both side by side.
The last line of stdout is one JSON object: ``{"tasks": {task: {metric: value}}}``
(and ``"compare"`` with the second configuration's, and their differences).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Target:
    base_url: str  # http://host:port (without /v1)
    model: str  # the served model name
    tokenizer: str | None  # a directory or hub id the harness loads with transformers


def served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    if r.status_code != 200 or not r.json().get("data"):
        raise ValueError(f"GET {base_url}/v1/models -> {r.status_code}: {r.text[:200]}")
    return str(r.json()["data"][0]["id"])


def export_tokenizer(model: str, out_dir: str, serve_args: list[str]) -> str:
    """Save the tokenizer ``kvasir serve MODEL`` uses (GGUF-embedded ones included) as an
    HF tokenizer directory the harness can load: the harness must tokenize exactly as
    the server does, since loglikelihood prompts travel as token ids."""
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.models.loader import load_tokenizer

    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    known, _ = p.parse_known_args(["--model", model, *serve_args])
    tok = load_tokenizer(EngineArgs.from_cli_args(known).create_engine_config().model_config)
    if tok is None:
        raise ValueError(f"model {model!r} has no tokenizer; lm-eval needs one")
    tok.save_pretrained(out_dir)
    return out_dir


@contextmanager
def kvasir_server(
    model: str, serve_args: list[str], api_key: str | None, log_dir: str
) -> Iterator[str]:
    """``kvasir serve MODEL`` on a free loopback port; yields its base URL and stops it
    (SIGTERM, then SIGKILL) on exit."""
    log_path = os.path.join(log_dir, f"serve-{time.monotonic_ns()}.log")
    args = [sys.executable, "-m", "kvasir.entrypoints.cli", "serve", model,
            "--host", "127.0.0.1", "--port", "0", *serve_args]  # fmt: skip
    if api_key:
        args += ["--api-key", api_key]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = _wait_healthy(proc, log_path)
        logger.info("kvasir serve %s %s: %s", model, " ".join(serve_args), url)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_healthy(proc: subprocess.Popen, log_path: str) -> str:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            text = f.read()
        if proc.poll() is not None:
            raise RuntimeError(f"kvasir serve exited with {proc.returncode}:\n{text[-4000:]}")
        m = re.search(r"listening on (http://[\d.]+:\d+)", text)
        if m:
            try:
                if httpx.get(m.group(1) + "/health", timeout=5).status_code == 200:
                    return m.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"kvasir serve did not become healthy in {STARTUP_TIMEOUT_S:.0f} s")


def model_args(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The harness's ``model_args`` for ``local-completions`` / ``local-chat-completions``."""
    root = target.base_url.rstrip("/").removesuffix("/v1")
    out: dict[str, Any] = {
        "model": target.model,
        "num_concurrent": args.num_concurrent,
        "max_retries": args.max_retries,
        "timeout": args.timeout,
        "max_length": args.max_length,
    }
    if args.chat:
        out.update(
            base_url=root + "/v1/chat/completions",
            tokenizer_backend=None,
            tokenized_requests=False,
        )
    else:
        out.update(
            base_url=root + "/v1/completions",
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            tokenizer=target.tokenizer or target.model,
        )
    return out


def run_harness(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` against ``target``; its results dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(
            f"kvasir eval lm-eval needs the lm-eval package ({e}): pip install lm-eval"
        ) from None

    if args.api_key:
        # how the harness's local-* models read the bearer token
        os.environ["OPENAI_API_KEY"] = args.api_key
    include = [os.path.abspath(p) for p in args.include_path or []]
    task_manager = TaskManager(include_path=include or None)
    tasks = [t for t in args.tasks.split(",") if t]
    results = lm_eval.simple_evaluate(
        model="local-chat-completions" if args.chat else "local-completions",
        model_args=model_args(target, args),
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=args.limit,
        log_samples=args.log_samples,
        apply_chat_template=args.chat,
        task_manager=task_manager,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's results (``acc,none`` -> ``acc``)."""
    out: dict[str, dict[str, float]] = {}
    for task, vals in results.get("results", {}).items():
        row = {}
        for key, v in vals.items():
            if "," not in key or not isinstance(v, (int, float)):
                continue
            name, filt = key.split(",", 1)
            row[name if filt == "none" else f"{name},{filt}"] = float(v)
        out[task] = row
    return out


def _write_outputs(results: dict[str, Any], out_dir: str, label: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    samples = results.pop("samples", None)
    with open(os.path.join(out_dir, f"results_{label}.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    if samples is not None:
        for task, rows in samples.items():
            with open(os.path.join(out_dir, f"samples_{label}_{task}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")
        results["samples"] = samples


def _evaluate(args: argparse.Namespace, serve_args: list[str], tmp: str, label: str) -> Any:
    if args.base_url:
        target = Target(
            args.base_url, args.model_name or served_model(args.base_url, args.api_key),
            args.tokenizer,
        )  # fmt: skip
        results = run_harness(target, args)
    else:
        tokenizer = args.tokenizer
        if tokenizer is None and not args.chat:
            tokenizer = export_tokenizer(args.model, os.path.join(tmp, "tokenizer"), serve_args)
        with kvasir_server(args.model, serve_args, args.api_key, tmp) as url:
            name = args.model_name or served_model(url, args.api_key)
            results = run_harness(Target(url, name, tokenizer), args)
    if args.output_path:
        _write_outputs(results, args.output_path, label)
    return results


def serve_args_from(text: str) -> list[str]:
    """``kvasir serve`` flags from ``--serve-args``/``--compare``: shell words, or a JSON
    object of engine fields as ``kvasir eval perplexity --compare`` takes
    (``{"speculative_config": {"method": "ngram"}, "enforce_eager": true}``)."""
    text = text.strip()
    if not text.startswith("{"):
        return shlex.split(text)
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare/--serve-args is not valid JSON ({e}): {text!r}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--compare/--serve-args JSON must be an object, got {text!r}")
    out: list[str] = []
    for key, value in fields.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        elif value is not None:
            out += [flag, str(value)]
    return out


def add_cli_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--base-url", default=None, help="a running server, e.g. http://127.0.0.1:8000"
    )
    where.add_argument("--model", default=None, help="start `kvasir serve MODEL` for the run")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", action="append", default=None,
                   help="directory of extra task YAMLs (repeatable)")  # fmt: skip
    p.add_argument("--serve-args", default="", help="extra `kvasir serve` flags (with --model)")
    p.add_argument("--compare", default=None, metavar="SERVE_ARGS",
                   help="with --model: also evaluate `kvasir serve MODEL SERVE_ARGS` and print "
                   "both; shell words or a JSON object of engine fields, e.g. "
                   "'{\"speculative_config\": {\"method\": \"ngram\"}}'")  # fmt: skip
    p.add_argument("--api-key", default=None, help="bearer token of the server")
    p.add_argument("--model-name", default=None, help="model id to request (default: /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer the harness uses (default with --model: the served model's)")  # fmt: skip
    p.add_argument("--chat", action="store_true", help="local-chat-completions (generation only)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per HTTP call")
    p.add_argument("--num-concurrent", type=int, default=1, help="HTTP calls in flight")
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--timeout", type=int, default=300, help="seconds per HTTP call")
    p.add_argument("--max-length", type=int, default=2048, help="the harness's context length")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-samples", action="store_true", help="keep per-document results")
    p.add_argument("--output-path", default=None, help="directory for results_*.json / samples")


def main(args: argparse.Namespace) -> int:
    if args.compare is not None and not args.model:
        raise ValueError("--compare needs --model (kvasir starts both configurations)")
    serve_args = serve_args_from(args.serve_args)
    from lm_eval.utils import make_table

    with tempfile.TemporaryDirectory(prefix="kvasir-lm-eval-") as tmp:
        results = _evaluate(args, serve_args, tmp, "main")
        print(make_table(results))
        summary: dict[str, Any] = {"tasks": metrics(results)}
        if args.compare is not None:
            other = _evaluate(args, [*serve_args, *serve_args_from(args.compare)], tmp, "compare")
            print(f"--compare {args.compare}:")
            print(make_table(other))
            summary["compare"] = {"serve_args": args.compare, "tasks": metrics(other)}
            summary["delta"] = {
                task: {m: summary["compare"]["tasks"][task][m] - v for m, v in row.items()
                       if m in summary["compare"]["tasks"].get(task, {})}
                for task, row in summary["tasks"].items()
            }  # fmt: skip
    print(json.dumps(summary))
    return 0
