"""Output redaction that works on a stream: PII and secret shapes are replaced by
``[REDACTED:<kind>]`` even when a match is split across chunks.

``StreamRedactor.feed(chunk)`` returns the text that is safe to emit now: everything
except a tail that could still be the start of a match (the last ``hold`` characters,
``hold`` >= the longest match a pattern can have), so a card number or key never leaves
in two halves. ``flush()`` at the end of the stream returns the rest, redacted. Matches
are found on the whole pending buffer, so the result of any chunking equals
``redact(full_text)`` (the property ``tests/security/test_guards.py`` checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# kind -> (pattern, longest match in characters)
PATTERNS: dict[str, tuple[re.Pattern[str], int]] = {
    "email": (
        re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}"),
        320,
    ),
    # Card numbers: digit runs (single spaces or dashes between digits) of 13-19 digits
    # holding a Luhn-valid 13-19 digit window; runs of 20 or more digits are redacted whole (a card can
    # hide inside them).
    "card": (re.compile(r"\d(?:[ -]?\d){12,59}"), 120),
    # API-key shapes: OpenAI/Anthropic-style sk-..., AWS access key ids, GitHub tokens,
    # Slack tokens, generic "Bearer <long token>".
    "api_key": (
        re.compile(
            # No word boundary before: a key glued to other text is still a key.
            r"(?:sk-[A-Za-z0-9_-]{16,100}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,80}"
            r"|xox[abprs]-[A-Za-z0-9-]{10,100})"
        ),
        110,
    ),
    # Phone numbers: international (+CC ...) or North-American (555-123-4567, (555) 123-4567).
    "phone": (
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,3}"
            r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\d)"
        ),
        30,
    ),
}


def _holds_card(digits: str) -> bool:
    """Some 13-19 digit window of ``digits`` passes the Luhn check (a card glued to
    other digits is still that card)."""
    n = len(digits)
    return any(
        luhn_ok(digits[i : i + k]) for k in range(13, min(n, 19) + 1) for i in range(n - k + 1)
    )


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Redactor:
    """Which kinds to redact, plus operator blocklist words (whole words, any case)."""

    kinds: tuple[str, ...] = ("email", "card", "api_key", "phone")
    blocklist: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for k in self.kinds:
            if k not in PATTERNS:
                raise ValueError(f"unknown redaction kind {k!r}; known: {sorted(PATTERNS)}")

    @property
    def hold(self) -> int:
        longest = [PATTERNS[k][1] for k in self.kinds] + [len(w) + 2 for w in self.blocklist]
        return max(longest, default=0)

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        found: list[tuple[int, int, str]] = []
        for kind in self.kinds:
            pat = PATTERNS[kind][0]
            for m in pat.finditer(text):
                if kind == "card":
                    digits = re.sub(r"\D", "", m.group(0))
                    if len(digits) < 20 and not _holds_card(digits):
                        continue
                found.append((m.start(), m.end(), kind))
        for w in self.blocklist:
            for m in re.finditer(rf"(?i)(?<!\w){re.escape(w)}(?!\w)", text):
                found.append((m.start(), m.end(), "blocklist"))
        found.sort(key=lambda sp: (sp[0], -sp[1]))  # the longest match at a start wins
        merged: list[tuple[int, int, str]] = []
        for s, e, k in found:
            if merged and s < merged[-1][1]:
                ps, pe, pk = merged[-1]
                merged[-1] = (ps, max(pe, e), pk)
            else:
                merged.append((s, e, k))
        return merged

    def redact(self, text: str) -> tuple[str, list[str]]:
        """The text with every match replaced, and the kinds found."""
        out, pos, kinds = [], 0, []
        for s, e, k in self.spans(text):
            out.append(text[pos:s])
            out.append(f"[REDACTED:{k}]")
            kinds.append(k)
            pos = e
        out.append(text[pos:])
        return "".join(out), kinds


class StreamRedactor:
    """Why holding back ``hold`` characters is enough: a match is at most ``hold``
    long, so one that starts before the cut and is not finished yet would be longer
    than ``hold``. A match that does cross the cut moves the cut to its start. The last
    emitted character is kept as left context for the patterns' look-behinds."""

    def __init__(self, redactor: Redactor) -> None:
        self.r = redactor
        self.left = ""
        self.pending = ""
        self.kinds: list[str] = []
        self.released_raw = ""  # the raw text behind what was emitted (for "flag")

    def _emit(self, final: bool) -> str:
        buf = self.left + self.pending
        base = len(self.left)
        cut = len(buf) if final else len(buf) - self.r.hold
        spans = [sp for sp in self.r.spans(buf) if sp[1] > base]
        for s, e, _ in spans:
            if s < cut < e:
                cut = s
        if cut <= base:
            return ""
        out, pos = [], base
        for s, e, k in spans:
            if s >= cut:
                break
            out.append(buf[pos:s])
            out.append(f"[REDACTED:{k}]")
            self.kinds.append(k)
            pos = e
        out.append(buf[pos:cut])
        self.released_raw += buf[base:cut]
        self.left, self.pending = buf[cut - 1 : cut], buf[cut:]
        return "".join(out)

    def feed(self, chunk: str) -> str:
        self.pending += chunk
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)
