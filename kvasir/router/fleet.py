"""The set of replicas and which of them may take a request: the model's weighted
versions (sticky per user), LoRA/model awareness, cordons, drains, ejections and the
N+1 hot spare. The policy then picks one of the candidates."""

from __future__ import annotations

import hashlib
import random

from kvasir.router.config import ModelRoute, RouterConfig
from kvasir.router.metrics import RouterMetrics
from kvasir.router.policy import Policy, make_policy
from kvasir.router.replica import Replica


def _unit(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (sticky version choice)."""
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def pick_version(route: ModelRoute, user: str | None) -> str:
    """A version by weight; the same ``user`` always gets the same version while the
    weights stay (a user at the low end of [0, 1) stays on v1 as v2's share grows)."""
    total = sum(route.versions.values())
    x = (_unit(user) if user is not None else random.random()) * total
    acc = 0.0
    last = ""
    for v, w in route.versions.items():
        if w <= 0:
            continue
        acc += w
        last = v
        if x < acc:
            return v
    return last


class Fleet:
    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.replicas: dict[str, Replica] = {}
        self.policy: Policy = make_policy(cfg)
        self.apply_config(cfg)

    def apply_config(self, cfg: RouterConfig) -> None:
        """Swap in a new config. Replicas that stay keep their state (load, health,
        cordons); requests in flight on removed ones finish on their own."""
        if cfg.policy != self.cfg.policy or cfg.tree_max_chars != self.cfg.tree_max_chars:
            self.policy = make_policy(cfg)
        elif hasattr(self.policy, "cfg"):
            self.policy.cfg = cfg  # type: ignore[attr-defined]
        new: dict[str, Replica] = {}
        for spec in cfg.replicas:
            old = self.replicas.get(spec.id)
            if old is not None and old.spec.url == spec.url:
                old.spec = spec
                new[spec.id] = old
            else:
                new[spec.id] = Replica(spec)
        for rid in set(self.replicas) - set(new):
            self.policy.forget(rid)
            for g in (self.metrics.healthy, self.metrics.outstanding):
                try:
                    g.remove(rid)
                except KeyError:
                    pass
        self.replicas = new
        self.cfg = cfg
        self.update_gauges()

    def update_gauges(self) -> None:
        for r in self.replicas.values():
            self.metrics.healthy.labels(r.id).set(1.0 if r.routable else 0.0)
            self.metrics.outstanding.labels(r.id).set(r.outstanding)

    def candidates(
        self, model: str | None, user: str | None, exclude: set[str]
    ) -> tuple[list[Replica], str | None]:
        """Replicas that may take a request for ``model`` (and the version chosen, if the
        model has weighted versions); empty if none."""
        pool = [r for r in self.replicas.values() if r.id not in exclude]
        version = None
        route = self.cfg.models.get(model) if model else None
        if route is not None:
            version = pick_version(route, user)
            chosen = [r for r in pool if r.spec.version == version]
            if not any(r.routable for r in chosen):
                # The chosen version is down: any other version of this model.
                chosen = [r for r in pool if r.spec.version in route.versions]
            pool = chosen
        elif model:
            # Model/LoRA awareness: prefer replicas that serve the name (adapters
            # appear in their /v1/models); unknown names go anywhere.
            serving = [r for r in pool if model in r.models]
            if serving:
                pool = serving
        main = [r for r in pool if not r.spec.spare]
        live = [r for r in main if r.routable]
        # N+1: spares take traffic only while a main replica is out (or none is left).
        if len(live) < len(main) or not live:
            live += [r for r in pool if r.spec.spare and r.routable]
        return live, version

    def get(self, replica_id: str) -> Replica | None:
        return self.replicas.get(replica_id)
