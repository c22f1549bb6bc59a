"""deploy/: promtool checks the rules and runs their unit tests (each alert fires on
synthetic series that breach it and stays quiet on series that do not); the tests have
teeth (a weakened rule fails them); the generated files are what the generators write;
the compose file and Prometheus config reference files that exist."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from server_utils import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "kvasir.rules.yml"
TESTS = DEPLOY / "prometheus" / "tests" / "kvasir.test.yml"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs Debian's prometheus (.ci/run installs it)"
)


def _load(path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=300)


@needs_promtool
def test_promtool_check_rules_and_config() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    out = _promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    out = _promtool("test", "rules", str(TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert of the rules file is exercised by at least one firing expectation.
    tests = yaml.safe_load(TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    alerts = {
        r["alert"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert alerts == fired


@needs_promtool
@pytest.mark.parametrize(
    "old, new",
    [
        ("> 0.72 and", "> 0.95 and"),  # TTFT fast burn would no longer fire at 18x
        (":zscore > 3", ":zscore > 300"),  # the anomaly alert would never fire
        # An availability page on any error: the within-budget model fires too.
        (
            "_rate1h > 0.0144 and kvasir:slo_availability_errors:ratio_rate5m > 0.0144",
            "_rate1h > 0 and kvasir:slo_availability_errors:ratio_rate5m > 0",
        ),
    ],
)
def test_weakened_rules_fail_the_unit_tests(tmp_path: Path, old: str, new: str) -> None:
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / "kvasir.rules.yml").write_text(text.replace(old, new, 1))
    shutil.copy(TESTS, tmp_path / "tests" / "kvasir.test.yml")
    out = _promtool("test", "rules", str(tmp_path / "tests" / "kvasir.test.yml"))
    assert out.returncode != 0, out.stdout


def test_generated_files_are_up_to_date() -> None:
    for gen in (DEPLOY / "prometheus" / "gen_rules.py", DEPLOY / "grafana" / "gen_dashboards.py"):
        for path, text in _load(gen).render().items():
            assert path.read_text() == text, (
                f"{path} is stale: run python {gen.relative_to(REPO_ROOT)}"
            )


def test_compose_references_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"kvasir", "prometheus", "grafana", "jaeger"} <= set(services)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert (DEPLOY / src).resolve().exists(), src
    # kvasir sends OTLP to Jaeger's gRPC port, which Jaeger exposes.
    assert "--otlp-traces-endpoint http://jaeger:4317" in services["kvasir"]["command"]
    assert "4317:4317" in services["jaeger"]["ports"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rf in prom["rule_files"]:
        assert (DEPLOY / "prometheus" / rf).exists()
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["kvasir"]["static_configs"][0]["targets"] == ["kvasir:8000"]
    assert "dcgm" in jobs
    prov = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "kvasir.yaml").read_text()
    )
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert any(
        v.endswith(":/var/lib/grafana/dashboards:ro") for v in services["grafana"]["volumes"]
    )
    assert len(list((DEPLOY / "grafana" / "dashboards").glob("*.json"))) == 3
