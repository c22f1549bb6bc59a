"""The committed case study is what the tool writes today."""

from __future__ import annotations

import os

from kvasir.plan.casestudy import build

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "tco-llama-3-70b.md")


def test_committed_case_study_matches_the_tool() -> None:
    with open(DOC, encoding="utf-8") as f:
        committed = f.read()
    assert committed == build(), (
        "docs/tco-llama-3-70b.md is stale: regenerate it with "
        "`kvasir plan casestudy --output docs/tco-llama-3-70b.md --plot-dir docs`"
    )


def test_case_study_chooses_configurations_that_meet_the_slo() -> None:
    text = build()
    assert "| h100-sxm TP2 FP8 |" in text and "| l40s TP4 FP8 |" in text
    table = text.split("## Configurations")[1].split("##")[0]
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[3].isdigit():  # a configuration that meets the SLO
            assert float(cells[4]) <= 50.0 and float(cells[5].replace(",", "")) <= 1000.0
