"""The router's pure parts: the radix tree, the policies, the config parser, versions."""

from __future__ import annotations

import time

import pytest

from kvasir.router.config import ConfigError, ModelRoute, ReplicaSpec, RouterConfig
from kvasir.router.fleet import Fleet, pick_version
from kvasir.router.metrics import RouterMetrics
from kvasir.router.policy import CacheAware, PowerOfTwo, RequestKey, SessionAffinity
from kvasir.router.radix import RadixTree
from kvasir.router.replica import Replica


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_radix_longest_prefix_and_split():
    t = RadixTree()
    t.insert("the cat sat on the mat", "a")
    t.insert("the cat ran", "b")
    assert t.match("the cat sat on the hat") == (len("the cat sat on the "), ["a"])
    n, holders = t.match("the cat r")
    assert n == len("the cat r") and holders == ["b"]
    n, holders = t.match("the cat")
    assert n == 7 and set(holders) == {"a", "b"}
    assert t.match("dog") == (0, sorted(t.root.tenants, key=lambda x: -t.root.tenants[x]))
    # Each tenant's character count is what it holds, shared edges counted once per tenant.
    assert t.num_chars == {"a": len("the cat sat on the mat"), "b": len("the cat ran")}
    assert t.match("the cat", {"b"}) == (7, ["b"])


def test_radix_bounded_lru():
    clock = Clock()
    t = RadixTree(max_chars=100, clock=clock)
    for i in range(20):
        clock.t = i
        t.insert(f"{i:02d}" + "x" * 18, "a")  # 20 chars each, no shared prefix
    assert t.num_chars["a"] <= 100
    # The most recent prompts stay, the oldest went first.
    assert t.match("19" + "x" * 18)[0] == 20
    assert t.match("00" + "x" * 18)[0] == 0
    # Recounting the tree agrees with the bookkeeping.
    held = sum(len(n.edge) for n in t._nodes() if "a" in n.tenants)
    assert held == t.num_chars["a"]


def test_radix_ages_out():
    clock = Clock()
    t = RadixTree(max_age_s=10, clock=clock)
    t.insert("old prompt", "a")
    clock.t = 5
    t.insert("new prompt", "b")
    clock.t = 12
    assert t.match("old prompt")[0] == 0  # stale: not matched
    assert t.match("new prompt") == (10, ["b"])
    assert t.expire() >= 1
    assert t.num_chars["a"] == 0 and t.num_chars["b"] == 10


def _replicas(n: int) -> list[Replica]:
    return [Replica(ReplicaSpec(f"r{i}", f"http://127.0.0.1:{9000 + i}")) for i in range(n)]


def test_cache_aware_follows_prefix_then_balances():
    cfg = RouterConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    pol = CacheAware(cfg)
    reps = _replicas(3)
    system = "You are a helpful assistant. " * 10
    first, decision = pol.choose(reps, RequestKey(system + "question one"))
    assert decision == "cache_miss"
    pol.routed(first, RequestKey(system + "question one"))
    for q in ("two", "three", "four"):
        r, decision = pol.choose(reps, RequestKey(system + "question " + q))
        assert (r.id, decision) == (first.id, "cache_hit")
        pol.routed(r, RequestKey(system + "question " + q))
    # A different prompt goes to the replica with the smallest tree, not the busy one.
    other, decision = pol.choose(reps, RequestKey("completely different"))
    assert decision == "cache_miss" and other.id != first.id
    # Unbalanced (10 vs 0: > 4 apart and > 1.5x): the least loaded wins over the cache.
    first.outstanding = 10
    r, decision = pol.choose(reps, RequestKey(system + "question five"))
    assert decision == "balance" and r.outstanding == 0
    # Below the absolute threshold the cache wins again.
    first.outstanding = 3
    assert pol.choose(reps, RequestKey(system + "question six")) == (first, "cache_hit")


def test_power_of_two_prefers_reported_load():
    reps = _replicas(2)
    reps[0].num_waiting = 7  # the replica's own queue (other routers' work)
    pol = PowerOfTwo()
    assert all(pol.choose(reps, RequestKey())[0] is reps[1] for _ in range(20))


def test_session_affinity_is_sticky_and_moves_only_the_lost_keys():
    reps = _replicas(3)
    pol = SessionAffinity()
    where = {s: pol.choose(reps, RequestKey(session=s))[0].id for s in map(str, range(60))}
    assert all(pol.choose(reps, RequestKey(session=s))[0].id == r for s, r in where.items())
    assert len(set(where.values())) == 3
    left = [r for r in reps if r.id != "r0"]
    for s, r in where.items():
        if r != "r0":  # keys of the remaining replicas stay put
            assert pol.choose(left, RequestKey(session=s))[0].id == r


def test_versions_weighted_and_sticky():
    route = ModelRoute({"v1": 90, "v2": 10})
    users = [f"user-{i}" for i in range(4000)]
    got = [pick_version(route, u) for u in users]
    share = got.count("v2") / len(got)
    assert 0.08 < share < 0.12
    assert got == [pick_version(route, u) for u in users]  # sticky
    # Growing v2's share only moves users v1 -> v2, never back.
    grown = [pick_version(ModelRoute({"v1": 50, "v2": 50}), u) for u in users]
    assert all(g == "v2" for g, o in zip(grown, got) if o == "v2")


def test_spare_takes_traffic_only_while_a_replica_is_out():
    cfg = RouterConfig(
        replicas=(
            ReplicaSpec("a", "http://127.0.0.1:1"),
            ReplicaSpec("b", "http://127.0.0.1:2"),
            ReplicaSpec("s", "http://127.0.0.1:3", spare=True),
        )
    )
    fleet = Fleet(cfg, RouterMetrics())
    ids = lambda: sorted(r.id for r in fleet.candidates(None, None, set())[0])  # noqa: E731
    assert ids() == ["a", "b"]
    fleet.replicas["a"].eject(cfg)
    assert ids() == ["b", "s"]
    fleet.replicas["a"].reinstate()
    assert ids() == ["a", "b"]
    fleet.replicas["b"].cordoned = True  # cordoned: out of the pool, and the spare steps in
    assert ids() == ["a", "s"]


def test_passive_ejection_backs_off_exponentially():
    cfg = RouterConfig(eject_consecutive_failures=2, eject_base_s=1.0, eject_max_s=4.0)
    r = _replicas(1)[0]
    assert not r.record(False, cfg) and r.record(False, cfg)
    first = r.ejected_until - time.monotonic()
    r.reinstate()
    assert not r.ejected
    r.record(False, cfg)
    r.record(False, cfg)
    second = r.ejected_until - time.monotonic()
    assert r.ejected and 0.9 < first <= 1.0 and 1.9 < second <= 2.0  # doubled
    for _ in range(3):
        r.reinstate()
        r.record(False, cfg)
        r.record(False, cfg)
    assert 3.9 < r.ejected_until - time.monotonic() <= 4.0  # capped at eject_max_s


CONFIG = """\
policy = "round_robin"

[[replicas]]
id = "a"
url = "http://127.0.0.1:8001"
version = "v1"

[[replicas]]
id = "b"
url = "http://127.0.0.1:8002"
version = "v2"

[models."chat"]
versions = { v1 = 90, v2 = 10 }
shadow = "v2"
"""


def test_config_parses():
    cfg = RouterConfig.from_toml(CONFIG)
    assert cfg.policy == "round_robin"
    assert [r.id for r in cfg.replicas] == ["a", "b"]
    assert cfg.models["chat"] == ModelRoute({"v1": 90, "v2": 10}, "v2")


@pytest.mark.parametrize(
    "bad,line,words",
    [
        (CONFIG.replace('policy = "round_robin"', 'policy = "fastest"'), 1, "fastest"),
        (CONFIG.replace('version = "v2"', 'version = "v2'), 11, "TOML"),
        (CONFIG.replace('url = "http://127.0.0.1:8002"', 'url = "ftp://x"'), 10, "ftp"),
        (CONFIG.replace("v2 = 10", "v2 = -1"), 14, "weight"),
        (CONFIG + "max_retires = 3\n", 16, "max_retires"),
        ("max_retires = 3\n" + CONFIG, 1, "max_retires"),
        (CONFIG.replace('shadow = "v2"', 'shadow = "v9"'), None, "v9"),
    ],
)
def test_config_errors_name_the_line(bad, line, words):
    with pytest.raises(ConfigError) as e:
        RouterConfig.from_toml(bad)
    assert words in str(e.value)
    if line is not None:
        assert e.value.line == line, str(e.value)
        assert f"line {line}" in str(e.value)


def test_model_and_lora_aware_candidates():
    cfg = RouterConfig(replicas=tuple(ReplicaSpec(x, f"http://127.0.0.1:{i + 1}")
                                      for i, x in enumerate("abc")))  # fmt: skip
    fleet = Fleet(cfg, RouterMetrics())
    fleet.replicas["a"].models = ("base", "sql-lora")
    fleet.replicas["b"].models = ("base",)
    fleet.replicas["c"].models = ("base",)
    ids = lambda m: sorted(r.id for r in fleet.candidates(m, None, set())[0])  # noqa: E731
    assert ids("sql-lora") == ["a"]  # only the replica holding the adapter
    assert ids("base") == ["a", "b", "c"]
    assert ids("unknown") == ["a", "b", "c"]  # the replicas answer 404 themselves
