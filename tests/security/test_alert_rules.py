"""The extraction-monitor alert rules: promtool checks them and runs their unit tests
(each alert fires for the abusive tenant and stays quiet for look-alike benign ones)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs Debian's prometheus (.ci/run installs it)"
)


@needs_promtool
def test_security_rules_check_and_unit_tests() -> None:
    rules = PROM / "rules" / "kvasir-security.rules.yml"
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        ["promtool", "test", "rules", "kvasir-security.test.yml"],
        capture_output=True,
        text=True,
        cwd=PROM / "tests",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rules/kvasir-security.rules.yml" in (PROM / "prometheus.yml").read_text()
