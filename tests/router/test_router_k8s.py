"""deploy/k8s: every manifest validates (strictly) against the Kubernetes schemas
(kubernetes-validate, offline), and what the manifests promise holds: the commands'
flags parse with kvasir's own parsers, the grace period covers --shutdown-timeout,
readiness follows /health, preStop drains, the HPA's metric is the one the
prometheus-adapter rule produces from kvasir:num_requests_waiting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def _docs() -> list[dict]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def _by_kind(kind: str, name: str) -> dict:
    return next(d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_manifests_validate_strictly():
    docs = _docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ConfigMap", "StatefulSet"} <= kinds  # fmt: skip
    version = kv.latest_version()
    for d in docs:
        kv.validate(d, version, strict=True)
    # A broken manifest is caught (the check can fail).
    bad = _by_kind("Deployment", "kvasir")
    bad = {**bad, "spec": {**bad["spec"], "replicas": "two"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_replica_deployment_matches_kvasir_serve():
    from kvasir.entrypoints.openai.api_server import add_cli_args

    dep = _by_kind("Deployment", "kvasir")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["kvasir", "serve"]
    args = add_cli_args(argparse.ArgumentParser(exit_on_error=False)).parse_args(c["args"])
    assert pod["terminationGracePeriodSeconds"] >= args.shutdown_timeout + 15
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] != "/health"  # a drain is not a restart
    assert "/admin/drain" in "".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    port = c["ports"][0]["containerPort"]
    assert args.port == port
    hpa = _by_kind("HorizontalPodAutoscaler", "kvasir")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "kvasir"
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(
        _by_kind("ConfigMap", "kvasir-prometheus-adapter")["data"]["config.yaml"]
    )
    (rule,) = rules["rules"]
    assert rule["name"]["as"] == metric
    assert "kvasir:num_requests_waiting" in rule["seriesQuery"]
    # The series exists: the engine's metrics define it.
    from kvasir.metrics import prometheus

    assert "kvasir:num_requests_waiting" in Path(prometheus.__file__).read_text()


def test_router_deployment_matches_kvasir_router():
    from kvasir.router.cli import add_router_parser

    dep = _by_kind("Deployment", "kvasir-router")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["kvasir", "router"]
    p = argparse.ArgumentParser()
    add_router_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["router", *c["args"]])
    assert args.replica_dns == ["kvasir-replicas:8000"] and args.etcd
    # The ConfigMap's router.toml is a valid router config.
    from kvasir.router.config import RouterConfig

    cfg = RouterConfig.from_toml(_by_kind("ConfigMap", "kvasir-router")["data"]["router.toml"])
    assert cfg.policy == "cache_aware"
    svc = _by_kind("Service", "kvasir-replicas")
    assert svc["spec"]["clusterIP"] == "None"  # headless: the router resolves every pod
