"""The router's configuration: replicas, the routing policy and its thresholds, health
checking, retries, migration, hedging, and the model -> weighted versions map.

From flags (``kvasir router --replica URL ...``) or a TOML file (``--config``)::

    policy = "cache_aware"
    [[replicas]]
    id = "a"
    url = "http://10.0.0.1:8000"
    version = "v1"          # default "default"
    spare = false           # a hot standby: traffic only while another is ejected
    [models."SmolLM2-135M-Instruct"]
    versions = { v1 = 90, v2 = 10 }   # weighted, sticky per user
    shadow = "v3"                       # copy of each request, answer discarded

A malformed file is refused with the line named; a reload that fails keeps the old
configuration (see ``RouterConfig.from_toml``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

POLICIES = ("round_robin", "least_outstanding", "power_of_two", "session_affinity", "cache_aware")


class ConfigError(ValueError):
    """A bad router configuration; ``line`` is the 1-based line in the file, if known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True)
class ReplicaSpec:
    id: str
    url: str
    version: str = "default"
    spare: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", self.id):
            raise ConfigError(f"replica id {self.id!r}: use letters, digits and _.:-")
        if not re.match(r"https?://[^/\s]+", self.url):
            raise ConfigError(f"replica {self.id!r}: url {self.url!r} is not http(s)://host[:port]")


@dataclass(frozen=True)
class ModelRoute:
    """A public model name mapped onto weighted versions (replica ``version`` labels)."""

    versions: dict[str, float]
    shadow: str | None = None

    def __post_init__(self) -> None:
        if not self.versions:
            raise ConfigError("versions must name at least one version")
        for v, w in self.versions.items():
            if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
                raise ConfigError(f"weight of version {v!r} must be a number >= 0, got {w!r}")
        if sum(self.versions.values()) <= 0:
            raise ConfigError("the version weights sum to 0")


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[ReplicaSpec, ...] = ()
    policy: str = "cache_aware"
    # cache-aware (the SGLang router's rule and defaults)
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001
    tree_max_chars: int = 2**20  # per replica
    tree_max_age_s: float = 600.0
    session_header: str = "x-session-id"
    # health
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    canary_interval_s: float = 10.0  # one-token completion; 0: off
    eject_consecutive_failures: int = 3
    eject_error_rate: float = 0.5  # over the last ``eject_window`` outcomes
    eject_window: int = 20
    eject_base_s: float = 1.0
    eject_max_s: float = 60.0
    # no lost requests
    max_retries: int = 2
    migration_limit: int = 3
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    hedge_after_ms: float = 0.0  # 0: off
    retry_after_s: int = 1
    models: dict[str, ModelRoute] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        for name in ("max_retries", "migration_limit", "eject_consecutive_failures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("health_interval_s", "health_timeout_s", "eject_base_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hedge_after_ms < 0:
            raise ConfigError(f"hedge_after_ms must be >= 0, got {self.hedge_after_ms}")
        ids = [r.id for r in self.replicas]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ConfigError(f"replica ids are not unique: {sorted(dup)}")
        versions = {r.version for r in self.replicas}
        for name, route in self.models.items():
            for v in [*route.versions, *([route.shadow] if route.shadow else [])]:
                if self.replicas and v not in versions:
                    raise ConfigError(f"model {name!r}: no replica has version {v!r}")

    def with_replicas(self, urls: list[str]) -> RouterConfig:
        """Add ``--replica URL`` flags (ids r0, r1, ... unless ``id=URL``)."""
        specs = list(self.replicas)
        for u in urls:
            rid, sep, url = u.partition("=")
            if not sep or rid.startswith("http"):
                rid, url = f"r{len(specs)}", u
            specs.append(ReplicaSpec(rid, url.rstrip("/")))
        return replace(self, replicas=tuple(specs))

    @classmethod
    def from_toml(cls, text: str, **overrides: Any) -> RouterConfig:
        """Parse and validate a TOML config; errors name the line (ConfigError)."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            line = int(m.group(1)) if m else max(1, len(text.splitlines()))  # "at end of document"
            raise ConfigError(f"not valid TOML: {e}", line) from None
        known = {f.name for f in fields(cls)} - {"replicas", "models"}
        kwargs: dict[str, Any] = {}
        for key, value in doc.items():
            if key in ("replicas", "models"):
                continue
            if key not in known:
                raise ConfigError(f"unknown key {key!r}", _line_of(text, key))
            want = type(getattr(cls, key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
                raise ConfigError(
                    f"{key} must be a {want.__name__}, got {value!r}", _line_of(text, key)
                )
            kwargs[key] = value
        replicas = []
        for i, r in enumerate(doc.get("replicas", [])):
            rline = _line_of(text, "[[replicas]]", i)
            if not isinstance(r, dict) or "url" not in r:
                raise ConfigError(f"replicas[{i}] needs a url", rline)
            extra = set(r) - {"id", "url", "version", "spare"}
            if extra:
                raise ConfigError(f"replicas[{i}]: unknown key(s) {sorted(extra)}", rline)
            try:
                replicas.append(
                    ReplicaSpec(
                        str(r.get("id", f"r{i}")),
                        str(r["url"]).rstrip("/"),
                        str(r.get("version", "default")),
                        bool(r.get("spare", False)),
                    )
                )
            except ConfigError as e:
                key = "url" if "url" in str(e) else "id"
                raise ConfigError(str(e), _line_after(text, rline, key)) from None
        models = {}
        for name, m in doc.get("models", {}).items():
            mline = _line_of(text, f'"{name}"') or _line_of(text, name)
            if not isinstance(m, dict) or not isinstance(m.get("versions"), dict):
                raise ConfigError(f"models.{name} needs a versions table", mline)
            for k in set(m) - {"versions", "shadow"}:
                raise ConfigError(f"models.{name}: unknown key {k!r}", _line_after(text, mline, k))
            try:
                models[name] = ModelRoute(dict(m["versions"]), m.get("shadow"))
            except ConfigError as e:
                raise ConfigError(
                    f"models.{name}: {e}", _line_after(text, mline, "versions")
                ) from None
        kwargs.update(overrides)
        try:
            return cls(replicas=tuple(replicas), models=models, **kwargs)
        except ConfigError as e:
            if e.line is None:
                word = re.search(r"^(\w+)", str(e))
                raise ConfigError(str(e), _line_of(text, word.group(1)) if word else None) from None
            raise


def _line_of(text: str, needle: str, nth: int = 0) -> int | None:
    """1-based line of the ``nth`` line containing ``needle`` (as a key when it is a word)."""
    pat = re.compile(
        rf"^\s*{re.escape(needle)}\s*=" if needle.isidentifier() else re.escape(needle)
    )
    seen = 0
    for no, line in enumerate(text.splitlines(), 1):
        if pat.search(line):
            if seen == nth:
                return no
            seen += 1
    return None


def _line_after(text: str, start: int | None, key: str) -> int | None:
    """The line of ``key = ...`` in the table that begins at line ``start``."""
    if start is None:
        return None
    lines = text.splitlines()
    for no in range(start, len(lines)):  # 0-based index ``start`` is the next line
        line = lines[no].strip()
        if line.startswith("["):
            break
        if re.match(rf"{re.escape(key)}\s*=", line):
            return no + 1
    return start
