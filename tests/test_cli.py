"""The command line: --help, generate on the default model, clear errors."""

from __future__ import annotations

import subprocess
import sys


def _kvasir(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvasir.entrypoints.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_subcommands() -> None:
    r = _kvasir("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "serve", "bench"):
        assert cmd in r.stdout
    g = _kvasir("generate", "--help")
    for flag in (
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--kv-cache-gb",
        "--no-enable-prefix-caching",
        "--load-format",
        "--dtype",
        "--scheduling-policy",
        "--attention-backend",
    ):
        assert flag in g.stdout


def test_generate_prints_answer_and_speed() -> None:
    r = _kvasir(
        "generate",
        "--raw",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--kv-cache-gb",
        "0.1",
        "--max-model-len",
        "512",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stdout
    # The start-up summary is a log message (stderr); stdout holds only the results.
    assert "KV cache" in r.stderr and "blocks" in r.stderr
    assert "KV cache" not in r.stdout


def test_bad_input_is_a_clear_error() -> None:
    r = _kvasir("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _kvasir("generate", "hi", "--temperature", "-1", "--kv-cache-gb", "0.1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_chat_streams_a_reply_and_exits() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvasir.entrypoints.cli",
            "chat",
            "--max-tokens",
            "6",
            "--kv-cache-gb",
            "0.05",
            "--max-model-len",
            "512",
        ],
        input="Say hello.\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "kvasir chat" in r.stdout
    assert "[6 tokens" in r.stdout or "tokens," in r.stdout
