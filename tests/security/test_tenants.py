"""Tenants: key lookup, file parsing, and the limiter's exact counts under a fake clock
and under concurrency (threads)."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from kvasir.security.tenants import (
    TenantLimitError,
    TenantLimits,
    TenantRegistry,
    load_tenants_file,
    parse_tenants,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _reg(limits: dict, clock: FakeClock, **extra) -> TenantRegistry:
    return TenantRegistry.from_dict(
        {"tenants": [{"name": "acme", "keys": ["sk-acme"], "limits": limits, **extra}]}, clock
    )


def test_lookup_plain_and_hashed_keys() -> None:
    digest = hashlib.sha256(b"sk-beta-secret").hexdigest()
    reg = TenantRegistry.from_dict(
        {
            "tenants": [
                {"name": "acme", "keys": ["sk-acme-1", "sk-acme-2"]},
                {"name": "beta", "keys": [f"sha256:{digest}"], "shared_prefix": True},
            ]
        }
    )
    assert reg.lookup("sk-acme-2").name == "acme"
    assert reg.lookup("sk-beta-secret").name == "beta"
    assert reg.lookup(f"sha256:{digest}") is None  # the hash itself is not a key
    assert reg.lookup("sk-acme") is None and reg.lookup("") is None and reg.lookup(None) is None
    assert reg.lookup("sk-acme-1").cache_salt == "tenant:acme"
    assert reg.lookup("sk-beta-secret").cache_salt is None  # shared_prefix opts out


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"tenants": [{"name": "a", "keys": []}]}, "tenants[0].keys"),
        ({"tenants": [{"name": "a", "keys": ["k"], "limits": {"rpm": 1}}]}, "unknown field"),
        (
            {"tenants": [{"name": "a", "keys": ["k"], "limits": {"max_n": 0}}]},
            "limits.max_n must be a positive integer",
        ),
        ({"tenants": [{"name": "a", "keys": ["sha256:abc"]}]}, "64 hex digits"),
        (
            {"tenants": [{"name": "a", "keys": ["k1"]}, {"name": "b", "keys": ["k1"]}]},
            "tenants[1] (b) repeats a key",
        ),
        ({"tenants": [{"name": "a", "keys": ["k"]}, {"name": "a", "keys": ["j"]}]}, "used twice"),
        ([], "must be an object"),
    ],
)
def test_bad_files_name_the_field_never_the_key(data: object, needle: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_tenants(data)
    assert needle in str(ei.value)
    assert "k1" not in str(ei.value).replace("tenants[1]", "")


def test_yaml_and_json_files(tmp_path) -> None:
    y = tmp_path / "keys.yaml"
    y.write_text("tenants:\n  - name: acme\n    keys: [sk-1]\n    limits: {max_tokens: 7}\n")
    tenants, keys = load_tenants_file(y)
    assert tenants[0].limits == TenantLimits(max_tokens=7)
    j = tmp_path / "keys.json"
    j.write_text(json.dumps({"tenants": [{"name": "acme", "keys": ["sk-1"]}]}))
    assert load_tenants_file(j)[0][0].name == "acme"
    bad = tmp_path / "bad.json"
    bad.write_text('{"tenants": [{"name": "x", "keys": ["sk-supersecret"]')
    with pytest.raises(ValueError) as ei:
        load_tenants_file(bad)
    assert "sk-supersecret" not in str(ei.value)


def test_requests_per_minute_exact_with_fake_clock() -> None:
    clock = FakeClock()
    reg = _reg({"requests_per_minute": 3}, clock)
    t = reg.lookup("sk-acme")
    for _ in range(3):
        reg.limiter.admit(t, 1, 1).finish(1)
    with pytest.raises(TenantLimitError) as ei:
        reg.limiter.admit(t, 1, 1)
    assert ei.value.limit == "requests_per_minute"
    assert ei.value.retry_after_s == 20  # one request refills in 60/3 s
    clock.t += 19.9
    with pytest.raises(TenantLimitError):
        reg.limiter.admit(t, 1, 1)
    clock.t += 0.1
    reg.limiter.admit(t, 1, 1)


def test_tokens_per_minute_charges_budget_and_refunds_unused() -> None:
    clock = FakeClock()
    reg = _reg({"tokens_per_minute": 600}, clock)  # refills 10 tokens/s
    t = reg.lookup("sk-acme")
    a = reg.limiter.admit(t, 100, 200, n=2)  # 100 + 2 * 200 = 500 up front
    with pytest.raises(TenantLimitError) as ei:
        reg.limiter.admit(t, 50, 100)  # needs 150, 100 left
    assert (ei.value.limit, ei.value.retry_after_s) == ("tokens_per_minute", 5)
    a.finish(30)  # used 30 of 400: 370 back -> 470 in the bucket
    a.finish(0)  # idempotent
    b = reg.limiter.admit(t, 50, 100)
    c = reg.limiter.admit(t, 120, 200)  # 470 - 150 - 320 = 0
    with pytest.raises(TenantLimitError):
        reg.limiter.admit(t, 1, 0)
    clock.t += 0.1  # +1 token
    reg.limiter.admit(t, 1, 0)
    b.finish(100)
    c.finish(200)
    # A request that can never fit is not a retry-later: no Retry-After.
    with pytest.raises(TenantLimitError) as ei:
        reg.limiter.admit(t, 1, 600)
    assert ei.value.retry_after_s is None and ei.value.param == "max_tokens"


def test_concurrency_exact_under_threads() -> None:
    """32 threads race to admit against max_concurrent_requests=5 and
    requests_per_minute=20 with a frozen clock: exactly 5 hold a slot at once, and
    exactly 20 are admitted in total."""
    clock = FakeClock()
    reg = _reg({"max_concurrent_requests": 5, "requests_per_minute": 20}, clock)
    t = reg.lookup("sk-acme")
    start = threading.Barrier(32)
    tickets = []
    refused: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        try:
            tk = reg.limiter.admit(t, 1, 1)
        except TenantLimitError as e:
            with lock:
                refused.append(e.limit)
            return
        with lock:
            tickets.append(tk)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(tickets) == 5 and refused == ["max_concurrent_requests"] * 27
    assert reg.limiter.num_running("acme") == 5
    # Now finish/admit in parallel rounds: the rpm bucket admits exactly 15 more.
    admitted = [len(tickets)]

    def cycle() -> None:
        for _ in range(10):
            with lock:
                tk = tickets.pop() if tickets else None
            if tk is not None:
                tk.finish(1)
            try:
                new = reg.limiter.admit(t, 1, 1)
            except TenantLimitError:
                continue
            with lock:
                tickets.append(new)
                admitted[0] += 1

    threads = [threading.Thread(target=cycle) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert admitted[0] == 20
    assert reg.limiter.num_running("acme") == len(tickets) <= 5


def test_reload_keeps_bucket_levels(tmp_path) -> None:
    clock = FakeClock()
    p = tmp_path / "keys.json"

    def write(rpm: int, key: str) -> None:
        p.write_text(json.dumps({"tenants": [
            {"name": "acme", "keys": [key], "limits": {"requests_per_minute": rpm}}]}))  # fmt: skip

    write(2, "sk-old")
    reg = TenantRegistry(p, clock)
    t = reg.lookup("sk-old")
    reg.limiter.admit(t, 1, 1)
    reg.limiter.admit(t, 1, 1)
    write(4, "sk-new")
    reg.reload()
    assert reg.lookup("sk-old") is None
    t = reg.lookup("sk-new")
    with pytest.raises(TenantLimitError):  # still empty: a reload is no free refill
        reg.limiter.admit(t, 1, 1)
    clock.t += 15  # the new rate: one per 15 s
    reg.limiter.admit(t, 1, 1)
    p.write_text("{not json")
    with pytest.raises(ValueError):
        reg.reload()
    assert reg.lookup("sk-new") is not None  # a bad file leaves the old tenants
