"""``kvasir serve --speculative-config``: the default model with n-gram drafts answers
exactly what the plain server answers (greedy, streamed and not), the speculative
decoding metrics move (vLLM's names), and the JSON request log carries the request's
acceptance; a bad config fails start-up with the field named."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from server_utils import MODEL, REPO_ROOT, start_server
from test_metrics import _scrape

PROMPT = (
    "Copy this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
    "Copy this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
    "Copy this list exactly: apple, banana,"
)


@pytest.fixture(scope="module")
def spec_server():
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
    srv = start_server("--log-requests-json", "--speculative-config", spec)
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


def test_ngram_server_matches_plain_server_and_reports_acceptance(spec_server, server) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    with server.client() as plain:
        want = plain.post("/v1/completions", json=body).json()["choices"][0]["text"]
    before = _scrape(spec_server)
    with spec_server.client() as c:
        got = c.post("/v1/completions", json=body).json()
        assert got["choices"][0]["text"] == want
        streamed = []
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed += [ch["text"] for ch in json.loads(line[6:])["choices"]]
        assert "".join(streamed) == want
    after = _scrape(spec_server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("kvasir:spec_decode_num_drafts_total") > 0
    assert delta("kvasir:spec_decode_num_draft_tokens_total") > 0
    accepted = delta("kvasir:spec_decode_num_accepted_tokens_total")
    assert accepted > 0
    per_pos = sum(v for k, v in after.items() if "accepted_tokens_per_pos_total" in k) - sum(
        v for k, v in before.items() if "accepted_tokens_per_pos_total" in k
    )
    assert per_pos == accepted
    assert 1 <= after["kvasir:spec_decode_num_speculative_tokens"] <= 4
    assert delta("kvasir:generation_tokens_total") == 48

    deadline = time.monotonic() + 5
    while True:
        recs = [json.loads(x) for x in spec_server.log().splitlines() if x.startswith('{"event"')]
        if recs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert recs and all(r["spec_draft_tokens"] >= r["spec_accepted_tokens"] > 0 for r in recs)
    assert all(0 < r["spec_acceptance_rate"] <= 1 for r in recs)


def test_bad_speculative_config_fails_start_up_naming_the_field() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "kvasir.entrypoints.cli", "serve", "--speculative-config",
         '{"method": "ngram", "num_speculative_tokens": -1}'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode != 0
    assert "speculative_config.num_speculative_tokens" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr
