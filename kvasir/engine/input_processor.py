"""Turns a user prompt + SamplingParams into validated EngineCoreRequests.

Runs on the client side (the offline LLMEngine or the API server), never in the engine
core's hot loop. Every error names the parameter and the allowed range.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from kvasir.engine.messages import EngineCoreRequest, SchedulingHints
from kvasir.lora.request import LoRARequest
from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import RequestOutputKind, SamplingParams


class ProcessedRequest(NamedTuple):
    prompt: str | None
    prompt_token_ids: list[int]
    core_requests: list[EngineCoreRequest]
    child_request_ids: list[str]


def child_request_id(index: int, parent_id: str) -> str:
    return f"{index}_{parent_id}"


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        # Chat: tokenise special tokens typed inside message content as control tokens
        # (off: they are plain text; the server's --allow-special-tokens-in-content).
        self.allow_special_tokens_in_content = False

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt must be a non-empty string or token-id list")
            if self.tokenizer is None:
                raise ValueError(
                    "prompt must be a list of token ids: this model has no tokenizer "
                    "(built-in dummy config)"
                )
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, dict):  # vLLM's {"prompt_token_ids": [...]} / {"prompt": ...}
            if "prompt_token_ids" in prompt:
                return self.tokenize(list(prompt["prompt_token_ids"]))
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must be a non-empty string or token-id list")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"prompt token id {t!r} is out of vocabulary: token ids must be "
                    f"integers in [0, {self.vocab_size})"
                )
        return None, ids

    def process(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        pooling_params: PoolingParams | None = None,
        lora_request: LoRARequest | None = None,
        hints: SchedulingHints | None = None,
    ) -> ProcessedRequest:
        """``hints``: tenant, service tier and SLOs, copied into every core request."""
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(
                "lora_request must be a LoRARequest(lora_name, lora_int_id, lora_path)"
            )
        if hints is not None:
            _check_hints(hints)
        if pooling_params is not None:
            p = self._process_pooling(
                request_id, prompt, pooling_params, arrival_time, priority, cache_salt
            )
            if hints is not None:
                _apply_hints(p.core_requests[0], hints)
            return p
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        text, ids = self.tokenize(prompt)
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(
                f"prompt is too long: {len(ids)} tokens + at least 1 generated token exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        if params.structured_outputs is not None:
            from kvasir.structured_output import validate

            validate(params.structured_outputs)
        for t in params.stop_token_ids or []:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}), got {t}")
        if params.logit_bias or params.allowed_token_ids or params.bad_words:
            params = self.resolve_token_masks(params)
        arrival = time.time() if arrival_time is None else arrival_time
        num_seqs = params.num_candidates
        if num_seqs == 1:
            child_ids = [request_id]
        else:
            child_ids = [child_request_id(i, request_id) for i in range(num_seqs)]
        core_requests = []
        for i, cid in enumerate(child_ids):
            child_params = params
            if num_seqs > 1:
                child_params = params.clone()
                child_params.n = 1
                child_params.best_of = None
                if num_seqs > params.n and child_params.logprobs is None:
                    child_params.logprobs = 0  # best_of ranks by cumulative logprob
                # Distinct but reproducible streams for the n samples of a seeded request.
                if params.seed is not None:
                    child_params.seed = params.seed + i
            core_requests.append(
                EngineCoreRequest(
                    request_id=cid,
                    prompt_token_ids=ids,
                    sampling_params=child_params,
                    eos_token_ids=list(self.eos_token_ids),
                    arrival_time=arrival,
                    priority=priority,
                    cache_salt=cache_salt,
                    fork_of=child_ids[0] if i > 0 else None,
                    lora_request=lora_request,
                )
            )
            if hints is not None:
                _apply_hints(core_requests[-1], hints)
        return ProcessedRequest(text, ids, core_requests, child_ids)

    def _process_pooling(
        self,
        request_id: str,
        prompt: str | list[int],
        pooling_params: PoolingParams,
        arrival_time: float | None,
        priority: int,
        cache_salt: str | None,
    ) -> ProcessedRequest:
        """An embedding request: its prompt's prefill, no sampled token (the sampling
        params only say "one step, one sequence")."""
        text, ids = self.tokenize(prompt)
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(
                f"prompt is too long: {len(ids)} tokens; at most max_model_len - 1 "
                f"({self.max_model_len - 1}) can be embedded"
            )
        params = SamplingParams(
            temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY
        )
        req = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling_params=params,
            eos_token_ids=list(self.eos_token_ids),
            arrival_time=time.time() if arrival_time is None else arrival_time,
            priority=priority,
            cache_salt=cache_salt,
            pooling_params=pooling_params,
        )
        return ProcessedRequest(text, ids, [req], [request_id])

    def resolve_token_masks(self, params: SamplingParams) -> SamplingParams:
        """Check logit_bias / allowed_token_ids against the vocabulary and tokenize
        bad_words (vLLM: each word as is and with a leading space, the latter only when
        it is a different token sequence of the same length)."""
        vocab = self.vocab_size
        for t in params.logit_bias or {}:
            if t >= vocab:
                raise ValueError(
                    f"logit_bias has token id {t}, outside the vocabulary [0, {vocab})"
                )
        for t in params.allowed_token_ids or []:
            if t >= vocab:
                raise ValueError(
                    f"allowed_token_ids has token id {t}, outside the vocabulary [0, {vocab})"
                )
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer; this model has none")
        word_ids: list[list[int]] = []
        for word in params.bad_words:
            plain = list(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = list(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if plain:
                word_ids.append(plain)
            if spaced and spaced != plain and len(spaced) == len(plain):
                word_ids.append(spaced)
        params = params.clone()
        params.bad_words_token_ids = word_ids
        return params

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Render in the limited sandbox (``kvasir.security.chat_template``): special
        tokens typed in message content stay text unless
        ``allow_special_tokens_in_content``; roles and structure are validated."""
        from kvasir.security.chat_template import tokenize_chat

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this model has none")
        if kwargs.get("chat_template") is None and (
            getattr(self.tokenizer, "chat_template", None) is None
        ):
            raise ValueError("this model's tokenizer has no chat template")
        return tokenize_chat(
            self.tokenizer,
            messages,
            add_generation_prompt=add_generation_prompt,
            allow_special_tokens=self.allow_special_tokens_in_content,
            **kwargs,
        )


def _check_hints(hints: SchedulingHints) -> None:
    from kvasir.core.sched_stats import normalize_service_tier

    normalize_service_tier(hints.service_tier)  # ValueError naming service_tier
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = getattr(hints, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _apply_hints(req: EngineCoreRequest, hints: SchedulingHints) -> None:
    req.tenant = hints.tenant
    req.service_tier = hints.service_tier
    req.ttft_slo_ms = hints.ttft_slo_ms
    req.tpot_slo_ms = hints.tpot_slo_ms
