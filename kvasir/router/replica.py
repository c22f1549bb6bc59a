"""One replica as the router sees it: its admin state (cordoned, draining), its health
(active checks and passive outlier detection with exponential back-off), and its load
(the router's own count of requests in flight plus what the replica reports)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvasir.router.config import ReplicaSpec, RouterConfig


@dataclass
class Replica:
    spec: ReplicaSpec
    outstanding: int = 0  # requests the router has in flight on it
    # reported by the replica's /health
    num_running: float = 0.0
    num_waiting: float = 0.0
    kv_usage: float = 0.0
    models: tuple[str, ...] = ()  # served model names and LoRA adapters (/v1/models)
    # admin
    cordoned: bool = False
    draining: bool = False  # router-side drain: cordoned until in-flight work is done
    # health
    healthy: bool = True  # last active check
    replica_draining: bool = False  # the replica's /health said draining
    ejected_until: float = 0.0
    num_ejections: int = 0  # consecutive; the back-off doubles with each
    consecutive_failures: int = 0
    outcomes: deque = field(default_factory=lambda: deque(maxlen=20))
    last_error: str = ""
    streams: set = field(default_factory=set)  # open relays (a drain may move them)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def ejected(self) -> bool:
        return time.monotonic() < self.ejected_until

    @property
    def routable(self) -> bool:
        """May take new requests (spares are chosen separately, see ``Fleet.candidates``)."""
        return (
            self.healthy
            and not self.ejected
            and not self.cordoned
            and not self.draining
            and not self.replica_draining
        )

    @property
    def load(self) -> float:
        """What the load-aware policies compare: the router's in-flight count, or the
        replica's own queue if that is longer (other routers send it work too)."""
        return max(float(self.outstanding), self.num_running + self.num_waiting)

    def record(self, ok: bool, cfg: RouterConfig, error: str = "") -> bool:
        """Passive health: one request's outcome. Returns True if it ejected the replica."""
        self.outcomes.append(ok)
        if ok:
            self.consecutive_failures = 0
            if len(self.outcomes) == self.outcomes.maxlen and all(self.outcomes):
                self.num_ejections = 0  # served a while without failing: reset the back-off
            return False
        self.last_error = error
        self.consecutive_failures += 1
        window = list(self.outcomes)[-cfg.eject_window :]
        rate_bad = len(window) >= min(cfg.eject_window, 5) and (
            window.count(False) / len(window) >= cfg.eject_error_rate
        )
        if self.consecutive_failures >= cfg.eject_consecutive_failures or rate_bad:
            self.eject(cfg)
            return True
        return False

    def eject(self, cfg: RouterConfig) -> None:
        backoff = min(cfg.eject_base_s * 2**self.num_ejections, cfg.eject_max_s)
        self.ejected_until = time.monotonic() + backoff
        self.num_ejections += 1
        self.consecutive_failures = 0
        self.outcomes.clear()

    def reinstate(self) -> None:
        """An active probe succeeded after the back-off: take traffic again. The back-off
        exponent is kept until the replica has served a while without failing."""
        self.ejected_until = 0.0

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "url": self.url,
            "version": self.spec.version,
            "spare": self.spec.spare,
            "healthy": self.healthy,
            "ejected": self.ejected,
            "ejected_for_s": max(0.0, round(self.ejected_until - time.monotonic(), 3)),
            "cordoned": self.cordoned,
            "draining": self.draining,
            "replica_draining": self.replica_draining,
            "outstanding": self.outstanding,
            "safe_to_stop": self.draining and self.outstanding == 0,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_usage_perc": self.kv_usage,
            "models": list(self.models),
            "last_error": self.last_error,
        }
