"""Green-list watermarking (Kirchenbauer et al., "A Watermark for Large Language
Models", 2023) and its detector.

At every sampled position the previous ``context`` tokens and a secret key seed a
pseudo-random split of the vocabulary: a fraction ``gamma`` of the token ids is
"green", and ``delta`` is added to their logits before sampling (after penalties and
masks, before temperature and top-k/p), so generated text holds more green tokens than
chance. The detector recomputes the split at each position of a text and reports the
one-proportion z-score of its green count, ``z = (g - gamma T) / sqrt(T gamma (1-gamma))``,
and its one-sided p-value.

The split is a keyed integer hash evaluated on the device for a whole ``[T, V]``
batch (no per-row Python): ``seed = mix(... mix(key + mix(c_1)) ... + mix(c_N))`` over
the context tokens, ``green(t) = mix(seed + mix(t)) < gamma * P`` with arithmetic
modulo the prime ``P = 2^31 - 1`` (every product fits in int64). The same functions run
in the detector on the CPU, so generation and detection agree bit for bit.

Where the runner calls it: ``ModelRunner`` before the sampler (the previous token is
the step's input token, on the device, so async scheduling needs no sync), and the
speculative verifier (``kvasir/spec_decode/decoder.py``) on the target logits of every
draft position with drafts 0..j-1 as context, so the rejection sampler accepts and
resamples against the watermarked distribution.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

P = 2**31 - 1
_ROUNDS = ((1103515245, 12345), (69069, 1), (48271, 11))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A keyed-hash round function on int64 values in [0, P)."""
    for a, b in _ROUNDS:
        x = (x * a + b) % P
        x = x ^ (x >> 15)
    return x


def key_int(key: str) -> int:
    return (
        int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") % P
    )


@dataclass(frozen=True)
class WatermarkParams:
    key: str
    gamma: float = 0.25
    delta: float = 2.0
    context: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError("watermark_key must be a non-empty string")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"watermark_gamma must be in (0, 1), got {self.gamma}")
        if not 0.0 <= self.delta <= 20.0:
            raise ValueError(f"watermark_delta must be in [0, 20], got {self.delta}")
        if not 1 <= self.context <= 8:
            raise ValueError(f"watermark_context must be in [1, 8], got {self.context}")


class Watermark:
    def __init__(self, params: WatermarkParams) -> None:
        self.params = params
        self.key = key_int(params.key)
        self.threshold = int(params.gamma * P)
        self._token_hash: dict[tuple[int, str], torch.Tensor] = {}

    def _hashed_vocab(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        k = (vocab_size, str(device))
        h = self._token_hash.get(k)
        if h is None:
            h = _mix(torch.arange(vocab_size, dtype=torch.int64, device=device) + 7)
            self._token_hash[k] = h
        return h

    def seeds(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[T] seeds of ``context_ids`` [T, N] (column 0: the token just before, then
        further back; -1 before the start of the text)."""
        s = torch.full(
            (context_ids.shape[0],), self.key, dtype=torch.int64, device=context_ids.device
        )
        for k in range(context_ids.shape[1]):
            s = _mix((s + _mix(context_ids[:, k].clamp(min=-1) + 2)) % P)
        return s

    def green_mask(self, context_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[T, V] bool: the green tokens after each context."""
        tok = self._hashed_vocab(vocab_size, context_ids.device)  # [V]
        x = (self.seeds(context_ids)[:, None] + tok[None, :]) % P  # [T, V]
        return _mix(x) < self.threshold

    def apply(self, logits: torch.Tensor, context_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` [T, V] plus delta on each row's green list (a new tensor)."""
        green = self.green_mask(context_ids, logits.shape[1])
        return logits + self.params.delta * green.to(logits.dtype)

    def is_green(self, token_ids: list[int], vocab_size: int) -> list[bool]:
        """Per position i >= 1 of ``token_ids``: was token i green after its context?"""
        n = self.params.context
        ids = np.asarray(token_ids, dtype=np.int64)
        if len(ids) < 2:
            return []
        ctx = context_window(ids, np.arange(1, len(ids)), n)  # [T, N]
        ctx_t = torch.from_numpy(ctx)
        x = (self.seeds(ctx_t) + _mix(torch.from_numpy(ids[1:]) + 7)) % P
        return (_mix(x) < self.threshold).tolist()

    def detect(self, token_ids: list[int], vocab_size: int) -> dict:
        """``{"z_score", "p_value", "num_tokens_scored", "num_green_tokens"}``; positions
        whose (context, token) pair already occurred are scored once (repeated n-grams
        would otherwise inflate z on repetitive text)."""
        n = self.params.context
        green = self.is_green(token_ids, vocab_size)
        seen: set[tuple[int, ...]] = set()
        g = t = 0
        for i, is_g in enumerate(green, start=1):
            key = tuple(token_ids[max(0, i - n) : i + 1])
            if key in seen:
                continue
            seen.add(key)
            t += 1
            g += int(is_g)
        gamma = self.params.gamma
        if t == 0:
            return {"z_score": 0.0, "p_value": 1.0, "num_tokens_scored": 0, "num_green_tokens": 0}
        z = (g - gamma * t) / math.sqrt(t * gamma * (1 - gamma))
        p = 0.5 * math.erfc(z / math.sqrt(2))
        return {"z_score": z, "p_value": p, "num_tokens_scored": t, "num_green_tokens": g}


def context_window(token_ids: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """[len(ends), n] int64: the tokens at ``ends - 1, ends - 2, ...`` of a 1-D
    ``token_ids`` (-1 before position 0)."""
    pos = ends[:, None] - 1 - np.arange(n)[None, :]
    ids = token_ids[np.clip(pos, 0, None)]
    return np.where(pos >= 0, ids, -1).astype(np.int64)


def rows_context(token_ids: np.ndarray, rows: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Like ``context_window`` for rows of a 2-D ``token_ids`` (the input batch)."""
    pos = ends[:, None] - 1 - np.arange(n)[None, :]  # [T, n]
    ids = token_ids[rows[:, None], np.clip(pos, 0, None)]
    return np.where(pos >= 0, ids, -1).astype(np.int64)


# ---------------------------------------------------------------- kvasir watermark detect


def add_cli_args(parser: object) -> None:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    sub = parser.add_subparsers(dest="watermark_command", required=True)
    d = sub.add_parser("detect", help="z-score of a text's green tokens (one JSON line)")
    d.add_argument("file", help="text file to score ('-': stdin)")
    d.add_argument("--key", required=True, help="the server's --watermark-key")
    d.add_argument("--model", default=None, help="model whose tokenizer made the text")
    d.add_argument("--gamma", type=float, default=0.25)
    d.add_argument("--context", type=int, default=1)
    d.set_defaults(func=detect_main)


def detect_main(args: object) -> int:
    import json
    import sys

    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.models.loader import load_tokenizer

    a = args  # argparse.Namespace
    text = sys.stdin.read() if a.file == "-" else open(a.file, encoding="utf-8").read()  # type: ignore[attr-defined]
    config = EngineArgs(model=a.model).create_engine_config()  # type: ignore[attr-defined]
    tok = load_tokenizer(config.model_config)
    if tok is None:
        raise ValueError("--model has no tokenizer")
    wm = Watermark(WatermarkParams(a.key, a.gamma, 0.0, a.context))  # type: ignore[attr-defined]
    ids = list(tok.encode(text, add_special_tokens=False))
    print(json.dumps(wm.detect(ids, len(tok))))
    return 0
