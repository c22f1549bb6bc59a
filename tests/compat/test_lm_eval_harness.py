"""``kvasir eval lm-eval``: EleutherAI's lm-evaluation-harness (the ``lm-eval`` package)
against a real ``kvasir serve`` over its ``local-completions`` model, on the repo's tiny
YAML tasks over local JSONL files (multiple choice and generation). The harness's
log-likelihoods, greedy flags, generations and metrics are checked against the same
quantities computed directly through ``LLM``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kvasir_server import API_KEY, REPO_ROOT, Server, subprocess_env

from kvasir import LLM, SamplingParams

TASKS_DIR = "tests/compat/lm_eval_tasks"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=2048, kv_cache_gb=0.05, log=False)


def _encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # The harness's rule for causal models: trailing spaces of the context move to the
    # continuation; the whole is tokenised once and split at the context's length.
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def _direct_loglikelihood(llm: LLM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    (out,) = llm.generate([ctx + cont], params, use_tqdm=False)
    total, greedy = 0.0, True
    for pos, tid in enumerate(cont, start=len(ctx)):
        entry = out.prompt_logprobs[pos]
        total += entry[tid].logprob
        greedy &= entry[tid].logprob >= max(lp.logprob for lp in entry.values())
    return total, greedy


def _samples(out_dir: Path, task: str) -> list[dict[str, Any]]:
    (path,) = out_dir.glob(f"samples_main_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(1800)
def test_lm_eval_against_kvasir_serve_matches_llm(
    kvasir_server: Server, llm: LLM, tmp_path: Path
) -> None:
    tok = llm.get_tokenizer()
    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(tok_dir)
    out_dir = tmp_path / "out"
    args = [
        sys.executable, "-m", "kvasir.entrypoints.cli", "eval", "lm-eval",
        "--base-url", kvasir_server.url, "--api-key", API_KEY, "--tokenizer", str(tok_dir),
        "--tasks", "kvasir_tiny_mc,kvasir_tiny_gen", "--include-path", TASKS_DIR,
        "--batch-size", "4", "--log-samples", "--output-path", str(out_dir),
    ]  # fmt: skip
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["tasks"]) == {"kvasir_tiny_mc", "kvasir_tiny_gen"}

    # multiple choice: every (context, choice) log-likelihood and greedy flag
    mc = _samples(out_dir, "kvasir_tiny_mc")
    assert len(mc) == 4
    correct = 0
    for s in mc:
        lls = []
        resps = [r[0] for r in s["resps"]]  # one [logprob, is_greedy] per choice
        for (ctx_text, cont_text), (ll, greedy) in zip(s["arguments"], resps, strict=True):
            ctx, cont = _encode_pair(tok, ctx_text, cont_text)
            want_ll, want_greedy = _direct_loglikelihood(llm, ctx, cont)
            assert math.isclose(ll, want_ll, rel_tol=1e-4, abs_tol=1e-3), (ctx_text, cont_text)
            assert bool(greedy) == want_greedy, (ctx_text, cont_text)
            lls.append(want_ll)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    assert summary["tasks"]["kvasir_tiny_mc"]["acc"] == pytest.approx(correct / len(mc))

    # generation: the harness's text equals LLM's greedy text, cut at the stop strings
    gen = _samples(out_dir, "kvasir_tiny_gen")
    assert len(gen) == 3
    matches = 0
    for s in gen:
        ctx_text, gen_kwargs = s["arguments"][0]
        ids = tok(ctx_text, add_special_tokens=False).input_ids
        (out,) = llm.generate(
            [ids],
            SamplingParams(
                temperature=0.0, max_tokens=gen_kwargs["max_gen_toks"], stop=gen_kwargs["until"]
            ),  # fmt: skip
            use_tqdm=False,
        )
        text = out.outputs[0].text
        assert s["resps"][0][0] == text, (ctx_text, s["resps"], text)
        matches += int(text.strip().strip(".").lower() == s["target"].lower())
    assert summary["tasks"]["kvasir_tiny_gen"]["exact_match"] == pytest.approx(matches / 3)


@pytest.mark.timeout(1800)
def test_lm_eval_model_mode_compare_speculative(tmp_path: Path) -> None:
    """``--model`` starts ``kvasir serve`` itself (and exports its tokenizer);
    ``--compare`` evaluates a speculative configuration in the same command. Speculative
    decoding must not move a log-likelihood: the two configurations score the same."""
    from kvasir.models.default import default_model_path

    args = [
        sys.executable, "-m", "kvasir.entrypoints.cli", "eval", "lm-eval",
        "--model", default_model_path(), "--tasks", "kvasir_tiny_mc",
        "--include-path", TASKS_DIR, "--limit", "2", "--output-path", str(tmp_path),
        "--serve-args", "--max-model-len 1024 --kv-cache-gb 0.05",
        "--compare", '{"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}',
    ]  # fmt: skip
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    base = summary["tasks"]["kvasir_tiny_mc"]
    assert set(base) >= {"acc", "acc_norm"}
    assert summary["compare"]["tasks"]["kvasir_tiny_mc"] == pytest.approx(base, abs=1e-9)
    assert all(
        v == pytest.approx(0.0, abs=1e-9) for v in summary["delta"]["kvasir_tiny_mc"].values()
    )
    assert (tmp_path / "results_main.json").exists() and (
        tmp_path / "results_compare.json"
    ).exists()
    assert "--compare {" in proc.stdout
