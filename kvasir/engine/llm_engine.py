"""The synchronous, in-process engine used by the offline ``LLM`` API and the CLI."""

from __future__ import annotations

import time

from kvasir.config import EngineConfig
from kvasir.engine.arg_utils import EngineArgs
from kvasir.engine.core import EngineCore
from kvasir.engine.input_processor import InputProcessor
from kvasir.engine.messages import SchedulingHints
from kvasir.engine.output_processor import OutputProcessor
from kvasir.lora.request import LoRARequest
from kvasir.outputs import RequestOutput
from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import SamplingParams


class LLMEngine:
    """Input processing -> EngineCore -> output processing, all in one process.

    A request that fails validation raises ValueError before anything is queued, so
    the other requests keep running.
    """

    def __init__(self, config: EngineConfig, log: bool = True) -> None:
        from kvasir.models.loader import load_tokenizer

        self.engine_core = EngineCore(config, log=log)
        self.config = self.engine_core.config
        self.model_info = self.engine_core.model_info
        self.tokenizer = load_tokenizer(config.model_config)
        info = self.model_info
        self.input_processor = InputProcessor(
            self.tokenizer, info.vocab_size, info.max_model_len, tuple(info.eos_token_ids)
        )
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, log: bool = True) -> LLMEngine:
        return cls(args.create_engine_config(), log=log)

    def add_request(
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
    ) -> None:
        """``pooling_params``: an embedding request (``params`` is then ignored);
        ``lora_request``: the adapter it runs under (None: the base model); ``hints``:
        tenant, service tier and SLOs for the scheduling policy."""
        arrival = time.time() if arrival_time is None else arrival_time
        p = self.input_processor.process(
            request_id, prompt, params, arrival, priority=priority, cache_salt=cache_salt,
            pooling_params=pooling_params, lora_request=lora_request, hints=hints,
        )  # fmt: skip
        params = p.core_requests[0].sampling_params if pooling_params is not None else params
        added: list[str] = []
        try:
            for cr in p.core_requests:
                self.engine_core.add_request(cr)
                added.append(cr.request_id)
        except ValueError:
            self.engine_core.abort_requests(added)
            raise
        self.output_processor.add_request(
            request_id, p.prompt, p.prompt_token_ids, params, arrival, p.child_request_ids
        )

    def abort_request(self, request_ids: list[str]) -> None:
        core_ids = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(core_ids)

    def step(self) -> list[RequestOutput]:
        outputs, _stats = self.engine_core.step()
        processed = self.output_processor.process_outputs(outputs)
        if processed.reqs_to_abort:
            self.engine_core.abort_requests(processed.reqs_to_abort)
        return processed.request_outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()
