"""The guard configuration and the pipeline the server runs (see ``kvasir.guard``).

File (JSON or YAML)::

    input:
      injection: {action: block}          # block | flag
    output:
      pii: {action: redact, kinds: [email, card, api_key, phone]}   # redact | block | flag
      blocklist: {action: redact, words: [projectx]}
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvasir.guard.injection import Finding, detect_injection
from kvasir.guard.redact import PATTERNS, Redactor, StreamRedactor

logger = logging.getLogger(__name__)
_INPUT_ACTIONS = ("block", "flag")
_OUTPUT_ACTIONS = ("block", "redact", "flag")


@dataclass(frozen=True)
class GuardConfig:
    injection_action: str | None = None
    pii_action: str | None = None
    pii_kinds: tuple[str, ...] = tuple(PATTERNS)
    blocklist_action: str | None = None
    blocklist: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.injection_action not in (None, *_INPUT_ACTIONS):
            raise ValueError(f"input.injection.action must be one of {_INPUT_ACTIONS}")
        for name in ("pii_action", "blocklist_action"):
            if getattr(self, name) not in (None, *_OUTPUT_ACTIONS):
                raise ValueError(
                    f"output.{name.split('_')[0]}.action must be one of {_OUTPUT_ACTIONS}"
                )
        Redactor(self.pii_kinds)  # unknown kinds fail here

    @classmethod
    def from_dict(cls, data: Any) -> GuardConfig:
        if not isinstance(data, dict) or set(data) - {"input", "output"}:
            raise ValueError("--guard-config: an object with 'input' and/or 'output'")
        inp, out = data.get("input") or {}, data.get("output") or {}
        inj, pii, bl = inp.get("injection"), out.get("pii"), out.get("blocklist")
        return cls(
            injection_action=(inj or {}).get("action", "flag") if inj is not None else None,
            pii_action=(pii or {}).get("action", "redact") if pii is not None else None,
            pii_kinds=tuple((pii or {}).get("kinds", PATTERNS)),
            blocklist_action=(bl or {}).get("action", "redact") if bl is not None else None,
            blocklist=tuple((bl or {}).get("words", ())),
        )

    @classmethod
    def load(cls, path: str | Path) -> GuardConfig:
        p = Path(path)
        text = p.read_text()
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"--guard-config {p}: {e}") from None


class GuardBlocked(Exception):
    def __init__(self, guard: str, findings: list[str]) -> None:
        super().__init__(f"{guard}: {', '.join(findings)}")
        self.guard = guard
        self.findings = findings


class Guards:
    """One per server. ``observe(guard, seconds, findings, action)`` goes to metrics."""

    def __init__(self, config: GuardConfig, metrics: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        c = config
        self.pii = Redactor(c.pii_kinds) if c.pii_action else None
        self.words = Redactor((), c.blocklist) if c.blocklist_action else None

    def _observe(self, guard: str, t0: float, found: list[str], action: str) -> None:
        if self.metrics is not None:
            self.metrics.observe(guard, time.perf_counter() - t0, found, action)
        if found:
            logger.info("guard %s (%s): %s", guard, action, ", ".join(sorted(set(found))))

    def check_input(self, text: str) -> list[Finding]:
        """Raises GuardBlocked (action block) or returns the findings (flag)."""
        action = self.config.injection_action
        if action is None:
            return []
        t0 = time.perf_counter()
        found = detect_injection(text)
        self._observe("injection", t0, [f.rule for f in found], action)
        if found and action == "block":
            raise GuardBlocked("injection", [f.rule for f in found])
        return found

    def output_stream(self) -> OutputGuard | None:
        if self.pii is None and self.words is None:
            return None
        return OutputGuard(self)


class OutputGuard:
    """Per choice of one request: ``feed(delta) -> (text to emit, blocked)``."""

    def __init__(self, guards: Guards) -> None:
        self.g = guards
        self.streams = [
            (name, StreamRedactor(r), action)
            for name, r, action in (
                ("pii", guards.pii, guards.config.pii_action),
                ("blocklist", guards.words, guards.config.blocklist_action),
            )
            if r is not None
        ]

    def _run(self, text: str, final: bool) -> tuple[str, bool]:
        """Each output guard in turn over the text the previous one released. block:
        the redacted text, then the stream ends; flag: the raw text, counted."""
        blocked = False
        for name, sr, action in self.streams:
            t0 = time.perf_counter()
            n = len(sr.kinds)
            redacted = sr.feed(text) + (sr.flush() if final else "")
            raw, sr.released_raw = sr.released_raw, ""
            found = sr.kinds[n:]
            self.g._observe(name, t0, found, action)
            blocked = blocked or (bool(found) and action == "block")
            text = raw if action == "flag" else redacted
        return text, blocked

    def feed(self, delta: str) -> tuple[str, bool]:
        return self._run(delta, final=False)

    def flush(self) -> tuple[str, bool]:
        return self._run("", final=True)


class GuardMetrics:
    """``kvasir:guard_latency_seconds{guard}`` and ``kvasir:guard_findings{guard,action}``."""

    def __init__(self, registry: Any, model_name: str) -> None:
        from prometheus_client import Counter, Histogram

        self.model_name = model_name
        self.latency = Histogram(
            "kvasir:guard_latency_seconds",
            "Time spent in each guard per call (input: per request; output: per chunk).",
            ["model_name", "guard"],
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
            registry=registry,
        )
        self.findings = Counter(
            "kvasir:guard_findings",
            "Guard matches, by guard and the action taken.",
            ["model_name", "guard", "action"],
            registry=registry,
        )

    def observe(self, guard: str, seconds: float, found: list[str], action: str) -> None:
        self.latency.labels(self.model_name, guard).observe(seconds)
        if found:
            self.findings.labels(self.model_name, guard, action).inc(len(found))
