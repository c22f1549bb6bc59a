"""OutputProcessor on synthetic engine-core output sequences (real tokenizer and none)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from kvasir.core.outputs import EngineCoreOutput
from kvasir.engine.output_processor import OutputProcessor
from kvasir.models.default import default_model_path
from kvasir.outputs import RequestOutput
from kvasir.sampling_params import RequestOutputKind, SamplingParams

CUMULATIVE, DELTA, FINAL_ONLY = (
    RequestOutputKind.CUMULATIVE,
    RequestOutputKind.DELTA,
    RequestOutputKind.FINAL_ONLY,
)
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def out(request_id: str, ids: list[int], **kwargs: Any) -> EngineCoreOutput:
    return EngineCoreOutput(request_id=request_id, new_token_ids=ids, **kwargs)


def run_single(
    processor: OutputProcessor, ids: list[int], params: SamplingParams, rid: str = "r"
) -> list[tuple[list[RequestOutput], list[str]]]:
    """One token per step; the last step finishes with "length"."""
    processor.add_request(rid, "prompt", [1, 2, 3], params, 0.0, [rid])
    steps = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        o = processor.process_outputs([out(rid, [t], finish_reason="length" if last else None)])
        steps.append((o.request_outputs, o.reqs_to_abort))
    return steps


def test_cumulative(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    processor = OutputProcessor(tokenizer)
    steps = run_single(processor, ids, SamplingParams(output_kind=CUMULATIVE))
    assert len(steps) == len(ids)
    for i, (outputs, aborts) in enumerate(steps):
        assert aborts == []
        (ro,) = outputs
        (c,) = ro.outputs
        assert ro.request_id == "r" and ro.prompt == "prompt" and ro.prompt_token_ids == [1, 2, 3]
        assert c.index == 0
        assert c.token_ids == ids[: i + 1]
        assert c.text == tokenizer.decode(ids[: i + 1])
        assert ro.finished == (i == len(ids) - 1)
        assert c.finish_reason == ("length" if ro.finished else None)
        assert c.cumulative_logprob is None and c.logprobs is None
    assert steps[-1][0][0].outputs[0].text == TEXT
    assert not processor.has_unfinished_requests()
    assert processor.get_num_unfinished_requests() == 0


def test_delta(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    processor = OutputProcessor(tokenizer)
    steps = run_single(processor, ids, SamplingParams(output_kind=DELTA))
    texts, tokens = [], []
    for i, (outputs, _) in enumerate(steps):
        (ro,) = outputs
        (c,) = ro.outputs
        assert c.token_ids == [ids[i]]
        texts.append(c.text)
        tokens += c.token_ids
    assert "".join(texts) == TEXT
    assert tokens == ids


def test_final_only(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    processor = OutputProcessor(tokenizer)
    steps = run_single(processor, ids, SamplingParams(output_kind=FINAL_ONLY))
    assert all(outputs == [] for outputs, _ in steps[:-1])
    (ro,) = steps[-1][0]
    assert ro.finished
    assert ro.outputs[0].text == TEXT and ro.outputs[0].token_ids == ids
    assert ro.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kind", [CUMULATIVE, DELTA, FINAL_ONLY])
def test_no_tokenizer(kind: RequestOutputKind) -> None:
    processor = OutputProcessor(None)
    ids = [5, 9, 7, 3]
    steps = run_single(processor, ids, SamplingParams(output_kind=kind, logprobs=1))
    outputs = [ro for step, _ in steps for ro in step]
    got = [t for ro in outputs for t in ro.outputs[0].token_ids]
    assert (got == ids) if kind != CUMULATIVE else (outputs[-1].outputs[0].token_ids == ids)
    assert all(ro.outputs[0].text == "" for ro in outputs)
    assert outputs[-1].finished


def test_stop_string_finishes_and_asks_for_abort(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["fox", "dog"], output_kind=DELTA)
    processor.add_request("r", None, [1], params, 0.0, ["r"])
    pieces, final = [], None
    for t in ids:
        o = processor.process_outputs([out("r", [t])])
        for ro in o.request_outputs:
            pieces.append(ro.outputs[0].text)
            final = ro
        if o.reqs_to_abort:
            assert o.reqs_to_abort == ["r"]
            break
    assert final is not None and final.finished
    c = final.outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", "fox")
    assert "".join(pieces) == "The quick brown "
    assert not processor.has_unfinished_requests()
    # Tokens the core produced before the abort landed are ignored.
    late = processor.process_outputs([out("r", [ids[-1]])])
    assert late.request_outputs == [] and late.reqs_to_abort == []


def test_stop_token_from_core_is_not_aborted(tokenizer: Any) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(skip_special_tokens=False)
    processor.add_request("r", None, [1], params, 0.0, ["r"])
    ids = tokenizer.encode("Done.") + [2]
    o = processor.process_outputs([out("r", ids, finish_reason="stop", stop_reason=None)])
    (c,) = o.request_outputs[0].outputs
    assert o.reqs_to_abort == []
    assert c.text == "Done." and c.token_ids == ids  # EOS text left out, id kept
    assert (c.finish_reason, c.stop_reason) == ("stop", None)


def feed_n2(
    processor: OutputProcessor, tokenizer: Any, kind: RequestOutputKind
) -> list[RequestOutput]:
    """Two samples: "0_r" stops on EOS after its 3rd step; "1_r" runs 5 steps to length."""
    a = tokenizer.encode(" alpha beta gamma")
    b = tokenizer.encode(" one two three four five")
    params = SamplingParams(n=2, output_kind=kind)
    processor.add_request("r", "p", [1, 2], params, 0.0, ["0_r", "1_r"])
    results = []
    for step in range(5):
        batch = []
        if step < len(a):
            last_a = step == len(a) - 1
            ids = [a[step]] + ([0] if last_a else [])
            batch.append(out("0_r", ids, finish_reason="stop" if last_a else None))
        batch.append(out("1_r", [b[step]], finish_reason="length" if step == 4 else None))
        o = processor.process_outputs(batch)
        assert o.reqs_to_abort == []
        results += o.request_outputs
    assert len(a) == 3 and len(b) == 5
    return results


def test_n2_cumulative(tokenizer: Any) -> None:
    results = feed_n2(OutputProcessor(tokenizer), tokenizer, CUMULATIVE)
    assert len(results) == 5
    assert [ro.finished for ro in results] == [False] * 4 + [True]
    for ro in results:
        assert [c.index for c in ro.outputs] == [0, 1]
    last = results[-1]
    assert last.outputs[0].text == " alpha beta gamma" and last.outputs[0].finish_reason == "stop"
    assert last.outputs[1].text == " one two three four five"
    assert last.outputs[1].finish_reason == "length"
    assert results[2].outputs[0].finish_reason == "stop"  # finished early, still reported


def test_n2_delta(tokenizer: Any) -> None:
    results = feed_n2(OutputProcessor(tokenizer), tokenizer, DELTA)
    assert len(results) == 5
    assert [[c.index for c in ro.outputs] for ro in results] == [[0, 1]] * 3 + [[1]] * 2
    texts = {0: "", 1: ""}
    finishes = {}
    for ro in results:
        for c in ro.outputs:
            texts[c.index] += c.text
            if c.finish_reason:
                assert c.index not in finishes  # the final chunk comes exactly once
                finishes[c.index] = c.finish_reason
    assert texts == {0: " alpha beta gamma", 1: " one two three four five"}
    assert finishes == {0: "stop", 1: "length"}
    assert [ro.finished for ro in results] == [False] * 4 + [True]


def test_n2_final_only(tokenizer: Any) -> None:
    processor = OutputProcessor(tokenizer)
    (ro,) = feed_n2(processor, tokenizer, FINAL_ONLY)
    assert ro.finished
    assert [c.text for c in ro.outputs] == [" alpha beta gamma", " one two three four five"]
    assert not processor.has_unfinished_requests()


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_logprobs_conversion(tokenizer: Any, with_tokenizer: bool) -> None:
    tok = tokenizer if with_tokenizer else None
    processor = OutputProcessor(tok)
    params = SamplingParams(logprobs=2, prompt_logprobs=1, output_kind=DELTA)
    prompt = [1, 504, 3445]
    processor.add_request("r", None, prompt, params, 0.0, ["r"])
    step1 = [[(905, -0.5, 2), (216, -0.3, 1), (905, -0.5, 2)]]  # sampled also in the top-k
    step2 = [[(28, -2.0, 5), (30, -0.1, 1), (31, -1.0, 2)]]
    prompt_lp = [[(504, -3.0, 10), (17, -1.0, 1)], [(3445, -4.0, 20), (18, -2.0, 1)]]
    o1 = processor.process_outputs(
        [out("r", [905], new_logprobs=step1, new_prompt_logprobs=prompt_lp)]
    )
    o2 = processor.process_outputs([out("r", [28], new_logprobs=step2, finish_reason="length")])
    (r1,), (r2,) = o1.request_outputs, o2.request_outputs

    def text(t: int) -> str | None:
        return tokenizer.decode([t]) if with_tokenizer else None

    pos = r1.outputs[0].logprobs
    assert pos is not None and len(pos) == 1
    assert list(pos[0]) == [905, 216]
    assert (pos[0][905].logprob, pos[0][905].rank) == (-0.5, 2)
    assert pos[0][905].decoded_token == text(905)
    assert pos[0][216].decoded_token == text(216)
    assert r1.outputs[0].cumulative_logprob == pytest.approx(-0.5)
    assert r2.outputs[0].logprobs is not None and list(r2.outputs[0].logprobs[0]) == [28, 30, 31]
    assert r2.outputs[0].cumulative_logprob == pytest.approx(-2.5)
    # Prompt logprobs: position 0 is None; reported once in DELTA mode.
    assert r1.prompt_logprobs is not None and r1.prompt_logprobs[0] is None
    assert [list(p) for p in r1.prompt_logprobs[1:]] == [[504, 17], [3445, 18]]  # type: ignore[arg-type]
    assert r1.prompt_logprobs[2][3445].rank == 20  # type: ignore[index]
    assert r1.prompt_logprobs[2][3445].decoded_token == text(3445)  # type: ignore[index]
    assert r2.prompt_logprobs is None


def test_abort_and_finish_aborted(tokenizer: Any) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, stop=["zzzzz"], output_kind=DELTA)
    processor.add_request("r", None, [1], params, 0.0, ["0_r", "1_r"])
    processor.add_request("s", None, [1], SamplingParams(), 0.0, ["s"])
    ids = tokenizer.encode(" hello world")
    o = processor.process_outputs([out("0_r", ids), out("1_r", ids, finish_reason="length")])
    (ro,) = o.request_outputs
    # The stop buffer (len("zzzzz") - 1 chars) holds back the tail of unfinished sample 0.
    assert ro.outputs[0].text == " hello world"[:-4] and ro.outputs[1].text == " hello world"

    final = processor.finish_aborted("r")
    assert final is not None and final.finished
    (c,) = final.outputs  # sample 1 had already finished and was reported
    assert (c.index, c.text, c.finish_reason) == (0, "orld", "abort")
    assert processor.abort_requests(["r", "unknown"]) == ["0_r"]
    assert processor.get_num_unfinished_requests() == 1
    assert processor.finish_aborted("r") is None
    assert processor.process_outputs([out("0_r", [5])]).request_outputs == []
    assert processor.abort_requests(["s"]) == ["s"]
    assert not processor.has_unfinished_requests()


def test_queue_routing_and_duplicates(tokenizer: Any) -> None:
    class Queue:
        def __init__(self) -> None:
            self.items: list[RequestOutput] = []

        def put_nowait(self, item: RequestOutput) -> None:
            self.items.append(item)

    processor = OutputProcessor(tokenizer)
    q = Queue()
    processor.add_request("a", None, [1], SamplingParams(), 0.0, ["a"], queue=q)
    processor.add_request("b", None, [1], SamplingParams(), 0.0, ["b"])
    with pytest.raises(ValueError, match="request_id"):
        processor.add_request("a", None, [1], SamplingParams(), 0.0, ["x"])
    o = processor.process_outputs([out("a", [42]), out("b", [43])])
    assert [ro.request_id for ro in o.request_outputs] == ["b"]
    assert [ro.request_id for ro in q.items] == ["a"]


def test_timings_and_stats(tokenizer: Any) -> None:
    processor = OutputProcessor(tokenizer, log_stats=True)
    processor.add_request("r", None, [1, 2, 3, 4], SamplingParams(), 100.0, ["r"])
    processor.process_outputs(
        [out("r", [10], first_scheduled_time=101.0, num_cached_tokens=2)], now=102.0
    )
    processor.process_outputs([out("r", [11])], now=103.0)
    o = processor.process_outputs([out("r", [12, 13], finish_reason="length")], now=105.0)
    (ro,) = o.request_outputs
    m = ro.metrics
    assert m is not None
    assert (m.arrival_time, m.first_scheduled_time) == (100.0, 101.0)
    assert (m.first_token_time, m.last_token_time, m.finished_time) == (102.0, 105.0, 105.0)
    assert ro.num_cached_tokens == 2
    s = ro.stats
    assert s is not None
    assert (s.num_prompt_tokens, s.num_generation_tokens, s.num_cached_tokens) == (4, 4, 2)
    assert s.finish_reasons == ["length"]
    assert s.inter_token_latencies == [1.0, 2.0]
    assert (s.queue_time, s.time_to_first_token, s.prefill_time) == (1.0, 2.0, 1.0)
    assert (s.decode_time, s.inference_time, s.e2e_latency) == (3.0, 4.0, 5.0)


def test_abort_one_sample_of_n2(tokenizer: Any) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, output_kind=CUMULATIVE)
    processor.add_request("r", None, [1], params, 0.0, ["0_r", "1_r"])
    assert processor.abort_requests(["1_r"]) == ["1_r"]
    assert processor.has_unfinished_requests()
    o = processor.process_outputs([out("0_r", [42], finish_reason="length"), out("1_r", [43])])
    (ro,) = o.request_outputs
    assert ro.finished
    assert [(c.token_ids, c.finish_reason) for c in ro.outputs] == [([42], "length"), ([], "abort")]
    assert not processor.has_unfinished_requests()
