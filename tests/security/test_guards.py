"""Guards: the rule set on the repository's corpus (detection and false-positive rates
reported and bounded), Luhn-checked card redaction, and the streaming redactor's
property: for any chunking of any text, the streamed output equals the one-shot
redaction, so no card number or key ever leaves split across chunk boundaries."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kvasir.guard.injection import detect_injection
from kvasir.guard.pipeline import GuardConfig, Guards
from kvasir.guard.redact import Redactor, StreamRedactor, luhn_ok

CORPUS = Path(__file__).parent / "data" / "injection_corpus.jsonl"


def test_rule_set_on_the_corpus() -> None:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    inj = [r for r in rows if r["label"] == "injection"]
    benign = [r for r in rows if r["label"] == "benign"]
    assert len(inj) >= 50 and len(benign) >= 50 and all(r["source"] for r in rows)
    detected = sum(bool(detect_injection(r["text"])) for r in inj) / len(inj)
    fp = sum(bool(detect_injection(r["text"])) for r in benign) / len(benign)
    print(f"injection corpus: detection {detected:.1%} of {len(inj)}, FP {fp:.1%} of {len(benign)}")
    assert detected >= 0.80 and fp <= 0.05


def test_luhn_and_kinds() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    r = Redactor()
    # 1234 1234 1234 1234 has no Luhn-valid 13-19 digit window: not a card.
    text, kinds = r.redact("pay 4111-1111-1111-1111 not 1234 1234 1234 1234; mail a.b@c.org")
    assert "[REDACTED:card]" in text and "1234 1234 1234 1234" in text
    assert "[REDACTED:email]" in text and sorted(kinds) == ["card", "email"]
    text, _ = r.redact("key sk-proj-AbCdEf0123456789xyzXYZ and AKIAIOSFODNN7EXAMPLE")
    assert text.count("[REDACTED:api_key]") == 2


CARD = "4111 1111 1111 1111"
KEY = "sk-AbCdEf0123456789GhIjKl"
_filler = st.text(alphabet="abc xyz 0123.,-@\n", max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from([CARD, KEY, "4111111111111111", "bob@example.com"]), min_size=1, max_size=3
    ),
    fillers=st.lists(_filler, min_size=4, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_streaming_redaction_never_leaks_across_chunks(parts, fillers, cuts) -> None:
    text = fillers[0]
    for i, p in enumerate(parts):
        text += p + fillers[(i + 1) % 4]
    r = Redactor(blocklist=("projectx",))
    whole, _ = r.redact(text)
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    sr = StreamRedactor(r)
    emitted = [sr.feed(c) for c in chunks] + [sr.flush()]
    streamed = "".join(emitted)
    assert streamed == whole
    for secret in (CARD, KEY, "4111111111111111"):
        assert secret not in streamed


def test_output_guard_actions() -> None:
    g = Guards(GuardConfig.from_dict({"output": {"pii": {"action": "flag"},
                                                 "blocklist": {"action": "block", "words": ["projectx"]}}}))  # fmt: skip
    o = g.output_stream()
    out, blocked = "", False
    for ch in ["mail bob@exa", "mple.com about pro", "jectx today"]:
        t, b = o.feed(ch)
        out, blocked = out + t, blocked or b
    t, b = o.flush()
    out, blocked = out + t, blocked or b
    assert blocked and "bob@example.com" in out and "projectx" not in out
