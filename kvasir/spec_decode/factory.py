"""Proposers by ``speculative_config.method``, and the n-gram one's adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvasir.config import SpeculativeConfig
from kvasir.spec_decode.ngram import NgramProposer
from kvasir.spec_decode.proposer import Proposal, ProposeInputs, Proposer

if TYPE_CHECKING:
    from kvasir.worker.model_runner import ModelRunner


class NgramLookupProposer(Proposer):
    """Prompt lookup over the persistent batch's host tokens (no model, no KV)."""

    name = "ngram"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.lookup = NgramProposer(config.k, config.prompt_lookup_min, config.prompt_lookup_max)

    def propose(self, inputs: ProposeInputs) -> Proposal:
        ib = inputs.runner.input_batch
        drafts, num = self.lookup.propose(
            ib.token_ids, inputs.num_tokens, inputs.rows, inputs.max_drafts
        )
        return Proposal(drafts.astype("int64"), num)


def build_proposer(config: SpeculativeConfig, runner: ModelRunner) -> Proposer:
    """The proposer of ``config.method`` for ``runner``'s model; raises ValueError naming
    the field when the method cannot work with this target."""
    if config.method == "ngram":
        return NgramLookupProposer(config)
    if config.method in ("self_spec", "draft_model"):
        from kvasir.spec_decode.draft_model import build_draft_model_proposer

        return build_draft_model_proposer(config, runner)
    if config.method in ("eagle", "medusa"):
        from kvasir.spec_decode.heads import build_head_proposer

        return build_head_proposer(config, runner)
    raise ValueError(f"speculative_config.method {config.method!r} is not supported")
