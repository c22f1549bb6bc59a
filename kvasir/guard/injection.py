"""A rule-based detector of prompt-injection and jailbreak phrasing.

Rule families follow public descriptions of the attack classes (OWASP Top 10 for LLM
Applications, LLM01 "Prompt Injection"; Perez & Ribeiro 2022, "Ignore Previous
Prompt"; Greshake et al. 2023, indirect injection through retrieved content; the
"DAN" / "developer mode" role-play jailbreaks as described in Shen et al. 2023, "Do
Anything Now"). Patterns are ours. Encoded payloads (base64, hex, rot13 hints) are
decoded and scanned again. Rules catch known phrasings, not intent: paraphrases pass,
and docs/security.md says so.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from typing import NamedTuple

_I = re.IGNORECASE
_PREV = r"(?:previous|prior|above|earlier|preceding|initial|original|all|any|your|the)"
_INSTR = r"(?:instructions?|rules|prompts?|directions|guidelines|directives|context|constraints)"
RULES: dict[str, list[re.Pattern[str]]] = {
    "ignore_instructions": [
        re.compile(
            rf"\b(?:ignore|disregard|forget|override|bypass|skip)\b[\w\s,'-]{{0,30}}?\b{_PREV}\b[\w\s'-]{{0,20}}?\b{_INSTR}\b",
            _I,
        ),
        re.compile(
            rf"\b(?:do not|don't|stop) (?:follow(?:ing)?|obey(?:ing)?)\b[\w\s'-]{{0,20}}\b{_INSTR}\b",
            _I,
        ),
        re.compile(r"\bnew (?:instructions|rules|task)\s*(?:are|is|:)", _I),
        re.compile(r"\b(?:ignore|disregard|forget) (?:the|everything|all of the) above\b", _I),
        re.compile(r"\bfrom now on,? (?:you|your) (?:will|must|are|respond|answer|only)", _I),
    ],
    "role_switch": [
        re.compile(r"\byou are (?:now|no longer)\b", _I),
        re.compile(
            r"\b(?:act|behave|respond) as (?:an? )?(?:unfiltered|uncensored|unrestricted|evil|jailbroken|rogue)\b",
            _I,
        ),
        re.compile(
            r"\bpretend (?:that )?(?:you are|you're|to be)\b.{0,60}\b(?:no|without) (?:restrictions|rules|limits|filters|guidelines)",
            _I,
        ),
        re.compile(r"\b(?:developer|god|jailbreak|dan|unrestricted|debug) mode\b", _I),
        re.compile(r"\bDAN\b|\bdo anything now\b", re.IGNORECASE),
        re.compile(r"\b(?:stay|remain) in character\b", _I),
    ],
    "policy_override": [
        re.compile(
            r"\b(?:no|without any|free of) (?:ethical |moral |safety |content )?(?:restrictions|limitations|filters|guidelines|rules|censorship) (?:apply|at all|whatsoever)?",
            _I,
        ),
        re.compile(
            r"\b(?:override|disable|turn off|deactivate) (?:your |all |the )?(?:safety|content|moderation) (?:policy|policies|filters?|guidelines|settings)",
            _I,
        ),
    ],
    "prompt_exfiltration": [
        re.compile(
            r"\b(?:reveal|print|show|repeat|output|leak|tell me|display|dump)\b.{0,25}\b(?:system prompt|system message|initial (?:prompt|instructions)|hidden (?:prompt|instructions)|developer (?:message|instructions)|your instructions)",
            _I,
        ),
        re.compile(
            r"\bwhat (?:is|was|were) (?:your|the) (?:system prompt|initial instructions|original instructions)",
            _I,
        ),
    ],
    "fake_markup": [
        re.compile(r"<\|(?:im_start|im_end|system|endoftext|start_header_id|eot_id)\|>", _I),
        re.compile(r"\[/?INST\]|<<\s*/?SYS\s*>>|</?s>\s*\[INST\]", _I),
        re.compile(
            r"^\s*(?:#{2,}|\*\*)?\s*(?:system|assistant)\s*(?:prompt|message)?\s*[:\]]\s*",
            _I | re.MULTILINE,
        ),
        re.compile(r"\bBEGIN (?:SYSTEM|ADMIN|DEVELOPER) (?:PROMPT|MESSAGE|INSTRUCTIONS)\b", _I),
    ],
    "indirect": [
        re.compile(
            r"\b(?:important|attention|note|message|instruction)s?\b[\s:!,-]{0,4}(?:to|for) (?:the |any )?(?:ai|assistant|model|llm|chatbot|language model)\b",
            _I,
        ),
        re.compile(
            r"\b(?:ai|assistant|model|llm)s? (?:reading|processing|summari[sz]ing) (?:this|these)\b",
            _I,
        ),
        re.compile(r"\bwhen you (?:read|see|process|summari[sz]e) this\b", _I),
        re.compile(
            r"\b(?:do not|don't|never) (?:tell|inform|mention (?:this )?to|let) the user\b", _I
        ),
        re.compile(r"\binstead of (?:summari[sz]ing|answering|translating)\b", _I),
    ],
    "encoded_payload": [
        re.compile(
            r"\b(?:decode|decipher|translate)\b.{0,40}\b(?:base64|hex|rot13|rot-13|binary)\b.{0,60}\b(?:follow|execute|obey|do what|carry out|run)\b",
            _I,
        ),
    ],
}
_B64 = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}){16,}\b")


class Finding(NamedTuple):
    rule: str
    text: str


def _scan(text: str) -> list[Finding]:
    out = []
    for rule, pats in RULES.items():
        for p in pats:
            m = p.search(text)
            if m is not None:
                out.append(Finding(rule, m.group(0)[:80]))
                break
    return out


def _decoded(text: str) -> list[str]:
    out = []
    for m in _B64.finditer(text):
        s = m.group(0)
        try:
            raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if raw and sum(32 <= b < 127 for b in raw) > 0.9 * len(raw):
            out.append(raw.decode("ascii", "ignore"))
    for m in _HEX.finditer(text):
        raw = bytes.fromhex(m.group(0))
        if sum(32 <= b < 127 for b in raw) > 0.9 * len(raw):
            out.append(raw.decode("ascii", "ignore"))
    if re.search(r"\brot-?13\b", text, _I):
        out.append(codecs.decode(text, "rot13"))
    return out


def detect_injection(text: str) -> list[Finding]:
    """The rule families ``text`` (and any base64/hex/rot13 payload inside it) hits."""
    found = _scan(text)
    for dec in _decoded(text):
        for f in _scan(dec):
            found.append(Finding("encoded_payload", f"{f.rule}: {f.text}"))
    return found
