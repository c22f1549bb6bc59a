"""Structured outputs below the server: parameter checks, xgrammar validation naming
the field, the engine-side manager's per-draft bitmask rows and rollback (against
fresh matchers advanced by hand), the worker's bitmask application (against a
plain-torch unpacking of the bits), and ``LLM`` with ``SamplingParams(structured_outputs=)``
with and without n-gram speculative decoding (greedy: the same tokens)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from kvasir import LLM, SamplingParams
from kvasir.core.outputs import SchedulerOutput
from kvasir.core.request import Request
from kvasir.sampling_params import StructuredOutputsParams
from kvasir.structured_output import validate
from kvasir.structured_output.bitmask import apply_token_bitmask, rows_bitmask
from kvasir.structured_output.manager import StructuredOutputManager

xgr = pytest.importorskip("xgrammar")


def test_params_need_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=[])
    p = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    assert p.kind == "json" and list(json.loads(p.json)["properties"]) == ["b", "a"]
    sp = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert isinstance(sp.structured_outputs, StructuredOutputsParams)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"regex": "(ab"}, "structured_outputs.regex"),
        ({"json": {"type": "nope"}}, "structured_outputs.json"),
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"grammar": "root ::= "}, "structured_outputs.grammar"),
        ({"grammar": "start ::= [a-z]"}, "structured_outputs.grammar"),  # no root rule
    ],
)
def test_validate_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(field)} is invalid"):
        validate(StructuredOutputsParams(**kwargs))


@pytest.fixture(scope="module")
def tokenizer():
    from kvasir.models.default import default_model_path
    from kvasir.models.loader import gguf_tokenizer

    return gguf_tokenizer(default_model_path())


def _manager(tokenizer) -> StructuredOutputManager:
    from kvasir.structured_output.backend import XgrammarBackend

    vocab = 49152
    return StructuredOutputManager(
        lambda: XgrammarBackend(tokenizer, vocab, [tokenizer.eos_token_id]), vocab
    )


def _ready(state) -> None:
    deadline = time.monotonic() + 60
    while not state.is_ready():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert state.error is None


def _mask_of(matcher, vocab: int) -> torch.Tensor:
    bm = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bm, 0)
    return bm[0]


def test_bitmask_rows_per_draft_and_rollback(tokenizer) -> None:
    vocab = 49152
    mgr = _manager(tokenizer)
    params = StructuredOutputsParams(regex=r"(ab|cd){1,4}x")
    state = mgr.add_request("r", params)
    other = mgr.add_request("s", params)  # same spec: compiled once
    _ready(state)
    _ready(other)
    assert mgr._futures and len(mgr._futures) == 1
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in ("ab", "cd", "x")}
    assert all(isinstance(i, int) and i > 0 for i in ids.values())
    state.accept_tokens([ids["ab"]])
    # Drafts: two valid, then one the grammar refuses (a second "x" after "x").
    drafts = [ids["cd"], ids["x"], ids["x"]]
    assert state.validate_tokens(drafts) == drafts[:2]
    assert state.validate_tokens(drafts[:2]) == drafts[:2]  # validation advanced nothing

    req = Request("r", [1, 2, 3], SamplingParams(structured_outputs=params))
    req.append_output_token_ids([ids["ab"]])
    req.num_computed_tokens = req.num_tokens + 2  # this step: 1 known token + 2 drafts
    so = SchedulerOutput([], [], {"r": 3}, 3, scheduled_spec_decode_tokens={"r": drafts[:2]})
    mgr.fill_bitmask(so, {"r": req})
    assert so.structured_output_request_ids == {"r": 0}
    rows = torch.from_numpy(np.frombuffer(so.grammar_bitmask, dtype=np.int32).reshape(3, -1).copy())
    # Reference: a fresh matcher advanced by hand over "ab", then each draft.
    ref = xgr.GrammarMatcher(mgr._backend.compile(params))
    assert ref.accept_token(ids["ab"])
    for j in range(3):
        assert torch.equal(rows[j], _mask_of(ref, vocab)), j
        if j < 2:
            assert ref.accept_token(drafts[j])
    # The manager's matcher rolled back: it still allows "cd" and "x" next, as after "ab".
    fresh = xgr.GrammarMatcher(mgr._backend.compile(params))
    fresh.accept_token(ids["ab"])
    assert torch.equal(_mask_of(state.matcher, vocab), _mask_of(fresh, vocab))
    # The runner's view: rows of a batch where only "r" is constrained.
    mask = rows_bitmask(so, ["u", "r", "r"], vocab, torch.device("cpu"), [0, 0, 2])
    assert mask is not None and (mask[0] == -1).all()
    assert torch.equal(mask[1], rows[0]) and torch.equal(mask[2], rows[2])
    state.accept_tokens([ids["x"], tokenizer.eos_token_id])
    assert state.is_terminated()
    mgr.shutdown()


def test_apply_token_bitmask_matches_torch_reference() -> None:
    g = torch.Generator().manual_seed(0)
    num_rows, vocab = 5, 1000  # not a multiple of 32
    logits = torch.randn(num_rows, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (num_rows, words), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[2] = -1  # an unconstrained row
    out = apply_token_bitmask(logits, bitmask)
    bits = (bitmask.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1  # [B, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab].bool()
    ref = logits.masked_fill(~allowed, float("-inf"))
    assert torch.equal(out, ref)
    assert torch.equal(out[2], logits[2])
    assert not torch.equal(out, logits)  # the caller's logits are untouched; out differs


SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "words": {
            "type": "array",
            "items": {"type": "string", "enum": ["one", "two", "three"]},
            "minItems": 3,
            "maxItems": 4,
        },
    },
    "required": ["count", "words"],
}


def test_llm_structured_outputs_with_and_without_speculation() -> None:
    import jsonschema

    prompts = [
        "Repeat after me: one two three one two three one two three. Now as JSON:",
        "Count to three as JSON:",
    ]
    constraints = [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(regex=r"(one |two |three ){3,6}done"),
    ]
    results = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4}):
        llm = LLM(log=False, max_model_len=512, speculative_config=spec)
        texts = []
        for so in constraints:
            sp = SamplingParams(temperature=0.0, max_tokens=96, structured_outputs=so)
            outs = llm.generate(prompts, sp, use_tqdm=False)
            for o in outs:
                assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
                texts.append(o.outputs[0].text)
        if spec is not None:
            stats = llm.llm_engine.engine_core.scheduler.make_stats()
            assert stats.spec_num_accepted_tokens > 0  # drafts were verified under the mask
        results.append(texts)
        del llm
    assert results[0] == results[1]  # greedy + lossless verification: the same text
    for text in results[0][:2]:
        jsonschema.validate(json.loads(text), SCHEMA)
    for text in results[0][2:]:
        assert re.fullmatch(r"(one |two |three ){3,6}done", text), text
