"""Routing policies: which of the routable replicas takes a request.

Each policy is a small class with one method, ``choose(candidates, req) -> (replica,
decision)``; ``decision`` labels ``kvasir_router:requests_total`` (e.g. "cache_hit" vs
"balance" for the cache-aware policy). ``candidates`` is never empty. Policies keep no
per-request state except the cache-aware tree, which ``routed`` feeds.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvasir.router.config import RouterConfig
from kvasir.router.radix import RadixTree
from kvasir.router.replica import Replica


@dataclass(frozen=True)
class RequestKey:
    """What a policy may look at: the prompt text (for prefix matching) and the session
    (header or the OpenAI ``user`` field) for affinity."""

    text: str = ""
    session: str | None = None


class Policy(ABC):
    name: str

    @abstractmethod
    def choose(self, candidates: list[Replica], req: RequestKey) -> tuple[Replica, str]:
        """Pick one of ``candidates`` (non-empty, all routable)."""

    def routed(self, replica: Replica, req: RequestKey) -> None:  # noqa: B027
        """Called once a request was sent to ``replica`` (a retry calls it again)."""

    def forget(self, replica_id: str) -> None:  # noqa: B027
        """The replica left the fleet."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list[Replica], req: RequestKey) -> tuple[Replica, str]:
        r = candidates[self._next % len(candidates)]
        self._next += 1
        return r, "round_robin"


class LeastOutstanding(Policy):
    name = "least_outstanding"

    def choose(self, candidates: list[Replica], req: RequestKey) -> tuple[Replica, str]:
        low = min(r.outstanding for r in candidates)
        return random.choice([r for r in candidates if r.outstanding == low]), "least_outstanding"


class PowerOfTwo(Policy):
    """Two random replicas, the less loaded one (load = the replica's reported running
    + waiting queue, or the router's in-flight count if larger; KV usage breaks ties)."""

    name = "power_of_two"

    def choose(self, candidates: list[Replica], req: RequestKey) -> tuple[Replica, str]:
        if len(candidates) == 1:
            return candidates[0], "only"
        a, b = random.sample(candidates, 2)
        return min((a, b), key=lambda r: (r.load, r.kv_usage)), "power_of_two"


def _rendezvous(candidates: list[Replica], key: str) -> Replica:
    """Highest-random-weight hashing: a key keeps its replica while that replica stays,
    and only the keys of a replica that leaves move."""

    def score(r: Replica) -> bytes:
        return hashlib.blake2b(f"{r.id}\0{key}".encode(), digest_size=8).digest()

    return max(candidates, key=score)


class SessionAffinity(Policy):
    """Same session (``x-session-id`` header or ``user``) -> same replica; requests
    without one go to the least-outstanding replica."""

    name = "session_affinity"

    def __init__(self) -> None:
        self._fallback = LeastOutstanding()

    def choose(self, candidates: list[Replica], req: RequestKey) -> tuple[Replica, str]:
        if req.session is None:
            return self._fallback.choose(candidates, req)[0], "no_session"
        return _rendezvous(candidates, req.session), "affinity"


class CacheAware(Policy):
    """The SGLang router's rule. If loads are unbalanced (max - min > abs threshold and
    max > rel threshold x min) go to the least-loaded replica. Otherwise go to the
    replica holding the longest prefix of the prompt if it covers more than
    ``cache_threshold`` of it, else to the replica with the smallest tree (the most
    room in its cache)."""

    name = "cache_aware"

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.tree = RadixTree(cfg.tree_max_chars, cfg.tree_max_age_s)
        self._since_expire = 0

    def choose(self, candidates: list[Replica], req: RequestKey) -> tuple[Replica, str]:
        cfg = self.cfg
        loads = [r.load for r in candidates]
        hi, lo = max(loads), min(loads)
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            return min(candidates, key=lambda r: (r.load, r.kv_usage)), "balance"
        by_id = {r.id: r for r in candidates}
        matched, holders = self.tree.match(req.text, set(by_id))
        if req.text and holders and matched / len(req.text) > cfg.cache_threshold:
            # Several replicas hold it: the least loaded of them.
            return min((by_id[h] for h in holders), key=lambda r: r.load), "cache_hit"
        return min(
            candidates, key=lambda r: (self.tree.num_chars.get(r.id, 0), r.load)
        ), "cache_miss"

    def routed(self, replica: Replica, req: RequestKey) -> None:
        if req.text:
            self.tree.insert(req.text, replica.id)
        self._since_expire += 1
        if self._since_expire >= 256:
            self._since_expire = 0
            self.tree.expire()

    def forget(self, replica_id: str) -> None:
        self.tree.remove_tenant(replica_id)


def make_policy(cfg: RouterConfig) -> Policy:
    if cfg.policy == "cache_aware":
        return CacheAware(cfg)
    classes: dict[str, type[Policy]] = {
        "round_robin": RoundRobin,
        "least_outstanding": LeastOutstanding,
        "power_of_two": PowerOfTwo,
        "session_affinity": SessionAffinity,
    }
    return classes[cfg.policy]()
