"""The offline API, as vLLM users know it: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kvasir.engine.arg_utils import EngineArgs
from kvasir.engine.beam_search import (
    BeamSearch,
    BeamSearchOutput,
    BeamSearchParams,
    TopLogprobs,
    run_beam_search,
    top_logprobs_of,
)
from kvasir.engine.llm_engine import LLMEngine
from kvasir.engine.messages import SchedulingHints
from kvasir.lora.request import LoRARequest
from kvasir.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Offline batched generation. Keyword arguments are ``EngineArgs`` fields
    (``max_model_len``, ``kv_cache_gb``, ``enable_prefix_caching``, ``dtype``, ...)."""

    def __init__(self, model: str | None = None, log: bool = True, **kwargs: Any) -> None:
        valid = set(EngineArgs.__dataclass_fields__)
        unknown = set(kwargs) - valid
        if unknown:
            raise ValueError(
                f"unknown engine argument(s) {sorted(unknown)}; valid: {sorted(valid)}"
            )
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args, log=log)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
        cache_salt: str | list[str | None] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        tenant: str | list[str | None] | None = None,
        service_tier: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs come back in input order.

        ``tenant`` (``--scheduling-policy fair``) and ``service_tier`` (interactive /
        batch: default SLOs for ``slo``) are one value for all prompts or one per prompt.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        ``lora_request``: one adapter for every prompt, or one (or None: the base
        model) per prompt; the engine needs ``enable_lora=True``.
        Raises ValueError (naming the parameter) if any prompt or parameter is invalid;
        nothing of that call is left running.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("prompts must be a non-empty string or list")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params must be one SamplingParams or a list of the same length "
                    f"as prompts ({len(prompts)}), got {len(params_list)}"
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError("priority must have the same length as prompts")
        salts = cache_salt if isinstance(cache_salt, list) else [cache_salt] * len(prompts)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(
                    f"lora_request must be one LoRARequest or a list of the same length as "
                    f"prompts ({len(prompts)}), got {len(loras)}"
                )
        tenants = _per_prompt(tenant, len(prompts), "tenant")
        tiers = _per_prompt(service_tier, len(prompts), "service_tier")
        hints = [
            SchedulingHints(tenant=t, service_tier=s) if t is not None or s is not None else None
            for t, s in zip(tenants, tiers)
        ]
        return self._run(prompts, params_list, use_tqdm, priority, salts, loras, hints)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {role, content}) or a list
        of conversations, formatted with the tokenizer's chat template."""
        if not messages:
            raise ValueError("messages must be a non-empty list")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        ip = self.llm_engine.input_processor
        prompts = [
            ip.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
            )
            for conv in conversations  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[EmbeddingRequestOutput]:
        """Embeddings (vLLM's ``LLM.embed``): each prompt's prefill, pooled (default: the
        last token's final hidden state, L2-normalised), in input order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("prompts must be a non-empty string or list")
        pp = pooling_params if pooling_params is not None else PoolingParams()
        hidden = self.llm_engine.model_info.hidden_size
        if pp.dimensions is not None and pp.dimensions > hidden:
            raise ValueError(f"dimensions must be <= the model's hidden size ({hidden})")
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for prompt in prompts:
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, SamplingParams(), pooling_params=pp)
                ids.append(rid)
        except ValueError:
            engine.abort_request(ids)
            raise
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        outs = []
        for rid in ids:
            o = finished[rid]
            assert o.pooled_output is not None
            outs.append(
                EmbeddingRequestOutput(rid, o.prompt_token_ids, EmbeddingOutput(o.pooled_output))
            )
        return outs

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search (vLLM's ``LLM.beam_search``): per prompt, the ``beam_width`` best
        hypotheses, best first (see ``kvasir/engine/beam_search.py`` for the ranking)."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        ip = self.llm_engine.input_processor
        searches = [
            BeamSearch(ip.tokenize(p)[1], params, ip.eos_token_ids, ip.max_model_len)
            for p in prompts  # type: ignore[union-attr]
        ]

        def generate(batch: list[list[int]], sp: SamplingParams) -> list[TopLogprobs]:
            outs = self.generate(batch, sp, use_tqdm=use_tqdm)  # type: ignore[arg-type]
            k = sp.logprobs or 0
            return [top_logprobs_of((o.outputs[0].logprobs or [{}])[0], k) for o in outs]

        results = run_beam_search(searches, generate)
        tok = self.get_tokenizer()
        for r in results:
            for seq in r.sequences:
                if tok is not None:
                    seq.text = tok.decode(
                        seq.output_token_ids,
                        skip_special_tokens=not params.include_stop_str_in_output,
                    )
        return results

    def _run(
        self,
        prompts: list[PromptType],
        params_list: list[SamplingParams],
        use_tqdm: bool,
        priority: list[int] | None,
        salts: list[str | None],
        loras: list[LoRARequest | None] | None = None,
        hints: list[SchedulingHints | None] | None = None,
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params_list)):
                if sp.output_kind != RequestOutputKind.FINAL_ONLY:
                    sp = sp.clone()
                    sp.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self._counter))
                engine.add_request(
                    rid, prompt, sp, priority=priority[i] if priority else 0, cache_salt=salts[i],
                    lora_request=loras[i] if loras else None, hints=hints[i] if hints else None,
                )  # fmt: skip
                ids.append(rid)
        except ValueError:
            engine.abort_request(ids)
            raise
        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        finished: dict[str, RequestOutput] = {}
        num_out_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    if pbar is not None:
                        num_out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        pbar.update(1)
                        elapsed = pbar.format_dict["elapsed"] or 1e-9
                        pbar.set_postfix_str(f"output {num_out_tokens / elapsed:.1f} tok/s")
        if pbar is not None:
            pbar.close()
        return [finished[r] for r in ids]


def _per_prompt(value: str | list[str | None] | None, n: int, name: str) -> list[str | None]:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} must be one value or a list as long as prompts ({n})")
        return value
    return [value] * n
