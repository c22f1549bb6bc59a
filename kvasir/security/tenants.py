"""Tenants of a shared endpoint: API keys mapped to named tenants with per-tenant limits.

``--api-keys-file FILE`` (JSON, or YAML when the name ends in .yaml/.yml)::

    {"tenants": [{"name": "acme",
                  "keys": ["sk-acme-1", "sha256:<64 hex>"],
                  "shared_prefix": false,
                  "admin": false,
                  "limits": {"requests_per_minute": 60, "tokens_per_minute": 20000,
                             "max_concurrent_requests": 4, "max_tokens": 512, "max_n": 2,
                             "max_logprobs": 5, "allowed_models": ["SmolLM2-135M-Instruct"]}}]}

Keys are kept only as SHA-256 digests (a key written as ``sha256:<hex>`` already is
one), looked up by comparing the presented key's digest with every stored digest in
constant time, and never logged: a tenant is only ever named by ``name``.

Admission (``TenantLimiter.admit``) charges a request's prompt tokens plus its whole
generation budget (``max_tokens * n``) to the tenant's tokens-per-minute bucket up front
and refunds the unused part when it finishes (``Ticket.finish``); requests-per-minute
is a second bucket of one token per request. Buckets refill continuously (capacity = the
per-minute rate, refill = rate / 60 per second), read a clock that tests replace, and
keep their level across a reload of the file. Pure Python: no torch, no HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LIMIT_FIELDS = {
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "max_tokens",
    "max_n",
    "max_logprobs",
    "allowed_models",
}
_TENANT_FIELDS = {"name", "keys", "limits", "shared_prefix", "admin"}
DEFAULT_MAX_LOGPROBS = 5


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class TenantLimits:
    """``None``: unlimited. ``max_logprobs`` caps ``logprobs``/``top_logprobs`` (and
    prompt logprobs); 0 forbids them."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_tokens: int | None = None
    max_n: int | None = None
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    allowed_models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent_requests",
            "max_tokens",
            "max_n",
        ):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"limits.{name} must be a positive integer or null, got {v!r}")
        v = self.max_logprobs
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"limits.max_logprobs must be an integer >= 0, got {v!r}")
        if self.allowed_models is not None and not all(
            isinstance(m, str) for m in self.allowed_models
        ):
            raise ValueError("limits.allowed_models must be a list of model names")


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits = field(default_factory=TenantLimits)
    # Opt-in to sharing prefix-cache blocks with other tenants (off: isolated).
    shared_prefix: bool = False
    # May call /admin/* (drain, tenant reload).
    admin: bool = False

    @property
    def cache_salt(self) -> str | None:
        """The salt mixed into block 0's hash of every request of this tenant: no
        other tenant's request can hit (or time) its prefix-cache blocks."""
        return None if self.shared_prefix else f"tenant:{self.name}"


def _parse_tenant(i: int, raw: Any) -> tuple[Tenant, list[bytes]]:
    where = f"tenants[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    unknown = set(raw) - _TENANT_FIELDS
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError(f"{where}.name must be a non-empty string of at most 64 characters")
    keys = raw.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{where}.keys must be a non-empty list")
    digests = []
    for j, k in enumerate(keys):
        if not isinstance(k, str) or not k:
            raise ValueError(f"{where}.keys[{j}] must be a non-empty string")
        if k.startswith("sha256:"):
            hexd = k[len("sha256:") :]
            try:
                d = bytes.fromhex(hexd)
            except ValueError:
                d = b""
            if len(d) != 32:
                raise ValueError(f"{where}.keys[{j}]: sha256: must be followed by 64 hex digits")
            digests.append(d)
        else:
            digests.append(key_digest(k))
    limits_raw = raw.get("limits") or {}
    if not isinstance(limits_raw, dict):
        raise ValueError(f"{where}.limits must be an object")
    unknown = set(limits_raw) - _LIMIT_FIELDS
    if unknown:
        raise ValueError(f"{where}.limits has unknown field(s) {sorted(unknown)}")
    lim = dict(limits_raw)
    if lim.get("allowed_models") is not None:
        if not isinstance(lim["allowed_models"], list):
            raise ValueError(f"{where}.limits.allowed_models must be a list")
        lim["allowed_models"] = tuple(lim["allowed_models"])
    if lim.get("max_logprobs") is None:
        lim.pop("max_logprobs", None)
    try:
        limits = TenantLimits(**lim)
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None
    for flag in ("shared_prefix", "admin"):
        if not isinstance(raw.get(flag, False), bool):
            raise ValueError(f"{where}.{flag} must be true or false")
    tenant = Tenant(name, limits, bool(raw.get("shared_prefix", False)), bool(raw.get("admin")))
    return tenant, digests


def parse_tenants(data: Any) -> tuple[list[Tenant], list[tuple[bytes, Tenant]]]:
    """The tenants of a loaded file and their (key digest, tenant) pairs."""
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ValueError('the API keys file must be an object {"tenants": [...]}')
    tenants: list[Tenant] = []
    keys: list[tuple[bytes, Tenant]] = []
    seen_names: set[str] = set()
    seen_keys: set[bytes] = set()
    for i, raw in enumerate(data["tenants"]):
        t, digests = _parse_tenant(i, raw)
        if t.name in seen_names:
            raise ValueError(f"tenants[{i}].name {t.name!r} is used twice")
        seen_names.add(t.name)
        for d in digests:
            if d in seen_keys:
                # Named by tenant, never by the key itself.
                raise ValueError(f"tenants[{i}] ({t.name}) repeats a key of another tenant")
            seen_keys.add(d)
            keys.append((d, t))
        tenants.append(t)
    return tenants, keys


def load_tenants_file(path: str | Path) -> tuple[list[Tenant], list[tuple[bytes, Tenant]]]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"--api-keys-file: cannot read {p}: {e.strerror}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # parse errors: name the file, not its contents (keys)
        raise ValueError(f"--api-keys-file: {p} is not valid {p.suffix or 'JSON'}: "
                         f"{type(e).__name__}") from None  # fmt: skip
    try:
        return parse_tenants(data)
    except ValueError as e:
        raise ValueError(f"--api-keys-file {p}: {e}") from None


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / 60`` per second of ``clock``."""

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / 60.0
        self.clock = clock
        self.level = float(capacity)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def resize(self, capacity: int) -> None:
        self._refill()
        self.capacity = float(capacity)
        self.rate = capacity / 60.0
        self.level = min(self.level, self.capacity)

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` tokens are there (0: now)."""
        self._refill()
        missing = cost - self.level
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self.level -= cost

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class TenantLimitError(Exception):
    """A request over one of its tenant's limits. ``limit`` names it (the field of
    ``TenantLimits``); ``retry_after_s`` is set for the rate and concurrency limits
    (HTTP 429 + Retry-After), None for a request that can never pass (HTTP 400/403)."""

    def __init__(
        self, message: str, limit: str, retry_after_s: int | None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.param = param


@dataclass
class _TenantState:
    tenant: Tenant
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    num_running: int = 0


class Ticket:
    """One admitted request: ``finish(num_generated)`` releases its concurrency slot
    and refunds the generation budget it did not use. Idempotent."""

    def __init__(self, limiter: TenantLimiter, state: _TenantState, budget: int) -> None:
        self._limiter = limiter
        self._state = state
        self.budget = budget
        self.done = False

    @property
    def tenant(self) -> Tenant:
        return self._state.tenant

    def finish(self, num_generated: int) -> None:
        if self.done:
            return
        self.done = True
        self._limiter._finish(self._state, max(self.budget - num_generated, 0))


class TenantLimiter:
    """Per-tenant buckets and concurrency counters, safe to call from several threads
    (the server calls it from its one event loop; tests hammer it from threads)."""

    def __init__(self, tenants: list[Tenant], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _TenantState] = {}
        self.update(tenants)

    def update(self, tenants: list[Tenant]) -> None:
        """New limits; a tenant that stays keeps its bucket levels and running count."""
        with self._lock:
            states: dict[str, _TenantState] = {}
            for t in tenants:
                st = self._states.get(t.name) or _TenantState(t)
                st.tenant = t
                lim = t.limits
                st.rpm = self._bucket(st.rpm, lim.requests_per_minute)
                st.tpm = self._bucket(st.tpm, lim.tokens_per_minute)
                states[t.name] = st
            self._states = states

    def _bucket(self, old: TokenBucket | None, rate: int | None) -> TokenBucket | None:
        if rate is None:
            return None
        if old is None:
            return TokenBucket(rate, self.clock)
        old.resize(rate)
        return old

    def num_running(self, name: str) -> int:
        st = self._states.get(name)
        return 0 if st is None else st.num_running

    def admit(self, tenant: Tenant, num_prompt_tokens: int, max_tokens: int, n: int = 1) -> Ticket:
        """Charge one request (``max_tokens``: its resolved generation budget per
        sequence) or raise TenantLimitError naming the limit."""
        budget = max_tokens * n
        cost = num_prompt_tokens + budget
        with self._lock:
            st = self._states.get(tenant.name)
            if st is None:  # removed by a reload while its key was being checked
                st = _TenantState(tenant)
            lim = st.tenant.limits
            if lim.max_concurrent_requests is not None:
                if st.num_running >= lim.max_concurrent_requests:
                    raise TenantLimitError(
                        f"tenant {tenant.name!r} already has {st.num_running} requests "
                        f"running, its limit (max_concurrent_requests) is "
                        f"{lim.max_concurrent_requests}",
                        "max_concurrent_requests",
                        1,
                    )
            if st.tpm is not None and cost > st.tpm.capacity:
                raise TenantLimitError(
                    f"the request needs {cost} tokens (prompt {num_prompt_tokens} + "
                    f"max_tokens {max_tokens} x n {n}), more than tenant {tenant.name!r}'s "
                    f"tokens_per_minute ({int(st.tpm.capacity)})",
                    "tokens_per_minute",
                    None,
                    "max_tokens",
                )
            waits = []
            if st.rpm is not None:
                waits.append(("requests_per_minute", st.rpm.wait_s(1)))
            if st.tpm is not None:
                waits.append(("tokens_per_minute", st.tpm.wait_s(cost)))
            for limit, wait in waits:
                if wait > 0:
                    rate = getattr(lim, limit)
                    raise TenantLimitError(
                        f"tenant {tenant.name!r} is over its {limit} limit ({rate}); "
                        f"retry in {wait:.1f}s",
                        limit,
                        max(1, math.ceil(wait)),
                    )
            if st.rpm is not None:
                st.rpm.take(1)
            if st.tpm is not None:
                st.tpm.take(cost)
            st.num_running += 1
            return Ticket(self, st, budget)

    def _finish(self, st: _TenantState, refund: int) -> None:
        with self._lock:
            st.num_running -= 1
            if st.tpm is not None and refund:
                st.tpm.give_back(refund)


class TenantRegistry:
    """Keys -> tenants, plus the limiter; ``reload()`` re-reads the file in place (a
    bad file leaves the old tenants serving and raises)."""

    def __init__(self, path: str | Path | None = None, clock: Callable[[], float] | None = None):
        self.path = Path(path) if path is not None else None
        self._keys: list[tuple[bytes, Tenant]] = []
        self.tenants: list[Tenant] = []
        self.limiter = TenantLimiter([], clock or time.monotonic)
        if self.path is not None:
            self.reload()

    @classmethod
    def from_dict(cls, data: Any, clock: Callable[[], float] | None = None) -> TenantRegistry:
        reg = cls(None, clock)
        reg.set(*parse_tenants(data))
        return reg

    def set(self, tenants: list[Tenant], keys: list[tuple[bytes, Tenant]]) -> None:
        self.limiter.update(tenants)
        self._keys = keys
        self.tenants = tenants

    def reload(self) -> list[Tenant]:
        assert self.path is not None
        self.set(*load_tenants_file(self.path))
        return self.tenants

    def lookup(self, key: str | None) -> Tenant | None:
        """The tenant of ``key`` (None: no such key). Every stored digest is compared,
        each in constant time, so the time taken says nothing about which matched."""
        if not key:
            return None
        d = key_digest(key)
        found = None
        for stored, tenant in self._keys:
            if hmac.compare_digest(stored, d):
                found = tenant
        return found
