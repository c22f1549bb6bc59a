"""``AsyncLLM``: the asyncio front end of an engine core running in its own process.

Tokenisation (``InputProcessor``) and detokenisation (``OutputProcessor``) happen here,
in the server process. One background task pulls output batches from the core and
routes them to per-request collectors; request coroutines only ever await their own
collector, so a slow client never slows the engine or the other streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kvasir.config import EngineConfig
from kvasir.engine.core import ModelInfo
from kvasir.engine.core_client import EngineCoreClient, EngineDeadError
from kvasir.engine.core_proc import EngineCoreOutputs
from kvasir.engine.input_processor import InputProcessor
from kvasir.engine.messages import SchedulingHints
from kvasir.engine.output_processor import OutputProcessor
from kvasir.metrics.prometheus import PrometheusMetrics
from kvasir.metrics.stats import FinishedRequestStats, RequestStatsTracker
from kvasir.outputs import CompletionOutput, RequestOutput
from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from kvasir.lora.request import LoRARequest
    from kvasir.metrics.lora import LoRAMetrics
    from kvasir.observability.tracing import RequestTrace, Tracing

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("kvasir.requests")

# Route at most this many core outputs before yielding to the event loop, so a huge
# batch does not stall the HTTP side (streams, health checks) for long.
_OUTPUT_CHUNK = 256

__all__ = ["AsyncLLM", "EngineDeadError", "RequestRejectedError"]


class RequestRejectedError(ValueError):
    """The engine core refused the request: it can never fit, or the waiting queue is
    full (``queue_full``: HTTP 429)."""

    def __init__(self, message: str, queue_full: bool = False, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.queue_full = queue_full
        self.retry_after_s = retry_after_s  # 0: the server's --retry-after


def _merge_delta(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Two DELTA outputs the consumer has not read yet become one (so a slow reader
    gets everything in fewer, larger pieces instead of an ever-growing backlog)."""
    by_index = {c.index: c for c in old.outputs}
    for c in new.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        logprobs = None
        if prev.logprobs is not None or c.logprobs is not None:
            logprobs = (prev.logprobs or []) + (c.logprobs or [])
        by_index[c.index] = CompletionOutput(
            index=c.index,
            text=prev.text + c.text,
            token_ids=list(prev.token_ids) + list(c.token_ids),
            cumulative_logprob=c.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
    return replace(
        new,
        outputs=sorted(by_index.values(), key=lambda c: c.index),
        prompt_logprobs=old.prompt_logprobs or new.prompt_logprobs,
        metrics=new.metrics or old.metrics,
    )


class RequestOutputCollector:
    """Per-request mailbox with ``put_nowait`` (producer: the output handler) and
    ``await get()`` (consumer: the request coroutine). Holds at most one item: DELTA
    outputs are merged, others replaced by the newer; an exception wins."""

    def __init__(self, output_kind: RequestOutputKind) -> None:
        self._delta = output_kind == RequestOutputKind.DELTA
        self._item: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        cur = self._item
        if self._delta and isinstance(cur, RequestOutput) and isinstance(item, RequestOutput):
            item = _merge_delta(cur, item)
        elif isinstance(cur, BaseException):
            return
        self._item = item
        self._ready.set()

    async def get(self) -> RequestOutput:
        while self._item is None:
            await self._ready.wait()
        item, self._item = self._item, None
        self._ready.clear()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncLLM:
    """Create with ``await AsyncLLM.create(config)``; then ``generate`` per request."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        model_info: ModelInfo,
        metrics: PrometheusMetrics,
        log_requests_json: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.served_model_name = model_info.model_name
        self.tracing = tracing
        # Per API request, only for requests that are traced / carry a tenant.
        self._traces: dict[str, tuple[RequestTrace, float]] = {}
        self._tenants: dict[str, str] = {}
        # Multi-LoRA: the adapter of each API request that has one, adapter names by id,
        # and the per-adapter metrics (None: LoRA off, no series).
        self._loras: dict[str, str] = {}
        self.lora_names: dict[int, str] = {}
        self.lora_metrics: LoRAMetrics | None = None
        if config.lora_config is not None:
            from kvasir.metrics.lora import LoRAMetrics

            self.lora_metrics = LoRAMetrics(metrics.registry, self.served_model_name)
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.metrics = metrics
        self.log_requests_json = log_requests_json
        self.input_processor = InputProcessor(
            tokenizer,
            model_info.vocab_size,
            model_info.max_model_len,
            tuple(model_info.eos_token_ids),
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.stats = RequestStatsTracker()
        self.core: EngineCoreClient | None = None
        self._collectors: dict[str, RequestOutputCollector] = {}
        self._parent_of: dict[str, str] = {}  # core request id -> API request id
        self._output_task: asyncio.Task | None = None
        self.dead_error: BaseException | None = None
        self._dead_callbacks: list[Any] = []

    @classmethod
    async def create(
        cls,
        config: EngineConfig,
        tokenizer: Any,
        log_requests_json: bool = False,
        log_level: str = "INFO",
        served_model_name: str | None = None,
        *,
        tracing: Tracing | None = None,
        tenant_metrics: bool = False,
        max_tenant_labels: int = 100,
        kv_cache_metrics_sample: float = 0.0,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
    ) -> AsyncLLM:
        """Spawn the engine core, wait for the model to load, start routing outputs.
        ``tracing``: export request traces; ``tenant_metrics``: per-tenant counters;
        ``kv_cache_metrics_sample``: sampled KV-block residency (0: off); ``slo_*``:
        the thresholds of ``kvasir:request_goodput``."""
        holder: list[AsyncLLM] = []

        def on_dead(exitcode: int | None) -> None:
            if holder:
                holder[0]._set_dead(
                    EngineDeadError(f"the engine core process died (exit code {exitcode})")
                )

        core = await EngineCoreClient.start(config, on_dead, log_level, kv_cache_metrics_sample)
        assert core.model_info is not None
        name = served_model_name or core.model_info.model_name
        metrics = PrometheusMetrics(
            name, tenant_metrics=tenant_metrics, max_tenant_labels=max_tenant_labels
        )
        metrics.slo_ttft_s, metrics.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self = cls(config, tokenizer, core.model_info, metrics, log_requests_json, tracing)
        self.served_model_name = name
        self.core = core
        holder.append(self)
        self._output_task = asyncio.create_task(self._output_handler(), name="kvasir-outputs")
        return self

    # ---------------------------------------------------------------- state

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._collectors)

    def add_dead_callback(self, fn: Any) -> None:
        """``fn(error)`` is called once if the engine core dies."""
        self._dead_callbacks.append(fn)

    def _set_dead(self, err: BaseException) -> None:
        if self.dead_error is not None:
            return
        self.dead_error = err
        for c in self._collectors.values():
            c.put_nowait(err)
        for fn in self._dead_callbacks:
            fn(err)

    # ---------------------------------------------------------------- requests

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_span: Any = None,
        tenant: str | None = None,
        pooling_params: PoolingParams | None = None,
        hints: SchedulingHints | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of one request until it finishes; closing the generator early (a
        client that went away) aborts it in the core. Raises ValueError (bad input,
        naming the parameter), RequestRejectedError or EngineDeadError.
        ``trace_span``: the request's server span (its engine spans become children);
        ``tenant``: the label its tokens are counted under. ``pooling_params``: an
        embedding request (one output, ``pooled_output`` set; ``params`` unused).
        ``hints``: what the scheduling policy reads (tenant, service tier, SLOs)."""
        if self.dead_error is not None:
            raise self.dead_error
        assert self.core is not None
        if request_id in self._collectors:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = time.time() if arrival_time is None else arrival_time
        p = self.input_processor.process(
            request_id, prompt, params, arrival, priority=priority, cache_salt=cache_salt,
            pooling_params=pooling_params, lora_request=lora_request, hints=hints,
        )  # fmt: skip
        if pooling_params is not None:
            params = p.core_requests[0].sampling_params
        collector = RequestOutputCollector(params.output_kind)
        self.output_processor.add_request(
            request_id,
            p.prompt,
            p.prompt_token_ids,
            params,
            arrival,
            p.child_request_ids,
            queue=collector,
        )
        self._collectors[request_id] = collector
        if trace_span is not None and self.tracing is not None:
            trace_span.set_attribute("gen_ai.response.id", request_id)
            tr = self.tracing.begin(
                trace_span, self.served_model_name, params, len(p.prompt_token_ids)
            )
            self._traces[request_id] = (tr, arrival)
        if tenant is not None:
            self._tenants[request_id] = tenant
        if lora_request is not None:
            self._loras[request_id] = lora_request.lora_name
            self.lora_names[lora_request.lora_int_id] = lora_request.lora_name
        for i, cid in enumerate(p.child_request_ids):
            self._parent_of[cid] = request_id
            self.stats.add_request(
                cid, request_id, arrival, len(p.prompt_token_ids) if i == 0 else 0
            )
        for cr in p.core_requests:
            self.core.add_request(cr)
        finished = False
        try:
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)
            self._forget(request_id, p.child_request_ids)

    def _forget(self, request_id: str, child_ids: list[str]) -> None:
        self._collectors.pop(request_id, None)
        self._traces.pop(request_id, None)
        self._tenants.pop(request_id, None)
        self._loras.pop(request_id, None)
        for cid in child_ids:
            self._parent_of.pop(cid, None)

    def abort(self, request_id: str, record: bool = True) -> None:
        """Abort a request everywhere (core, detokenizer, stats). Idempotent.
        ``record``: count it as a finished ("abort") request in the metrics."""
        core_ids = self.output_processor.abort_requests([request_id])
        if self.core is not None:
            self.core.abort_requests(core_ids)
        finished = self.stats.finish(core_ids, "abort", time.time())
        if record:
            self._record_finished(finished)

    def finish_aborted(self, request_id: str) -> None:
        """Drain timeout: end a request with finish_reason "abort" (the client gets a
        normal last chunk rather than a cut connection)."""
        collector = self._collectors.get(request_id)
        final = self.output_processor.finish_aborted(request_id)
        self.abort(request_id)
        if collector is not None and final is not None:
            collector.put_nowait(final)

    def in_flight_request_ids(self) -> list[str]:
        return list(self._collectors)

    # ---------------------------------------------------------------- outputs

    async def _output_handler(self) -> None:
        assert self.core is not None
        try:
            while True:
                batch = await self.core.get_output()
                self._handle_batch(batch)
                for start in range(_OUTPUT_CHUNK, len(batch.outputs), _OUTPUT_CHUNK):
                    await asyncio.sleep(0)
                    self._route(batch.outputs[start : start + _OUTPUT_CHUNK], batch.timestamp)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave requests hanging forever
            logger.exception("output handler failed")
            self._set_dead(EngineDeadError(f"output handler failed: {e!r}"))

    def _handle_batch(self, batch: EngineCoreOutputs) -> None:
        for rej in batch.rejected:
            parent = self._parent_of.get(rej.request_id)
            if parent is None:
                continue
            # Drop the whole request (its other samples may have been accepted); it never
            # ran, so it is not a finished request for the metrics.
            self.abort(parent, record=False)
            collector = self._collectors.get(parent)
            if collector is not None:
                collector.put_nowait(
                    RequestRejectedError(rej.message, rej.queue_full, rej.retry_after_s)
                )
        st = batch.step_stats
        if st is not None:
            self.metrics.record_step(st)
            if st.preempted_req_ids:
                self.stats.record_preemptions(
                    st.preempted_req_ids, st.preemption_reasons, st.start_time
                )
        self._route(batch.outputs[:_OUTPUT_CHUNK], batch.timestamp)
        if batch.scheduler_stats is not None:
            self.metrics.record_scheduler_stats(batch.scheduler_stats)
            if self.lora_metrics is not None:
                self.lora_metrics.record_stats(batch.scheduler_stats, self.lora_names)

    def _route(self, outputs: list, engine_time: float | None = None) -> None:
        if not outputs:
            return
        now = time.time()
        it = self.stats.update(outputs, now, engine_time or None)
        processed = self.output_processor.process_outputs(outputs)
        if processed.reqs_to_abort:
            # Stop strings are matched here, after detokenisation: stop those in the core.
            if self.core is not None:
                self.core.abort_requests(processed.reqs_to_abort)
            it.finished += self.stats.finish(processed.reqs_to_abort, "stop", now)
        self.metrics.record_iteration(it)
        self._log_finished(it.finished)

    def _record_finished(self, finished: list[FinishedRequestStats]) -> None:
        self.metrics.record_finished(finished)
        self._log_finished(finished)

    def _observe_finished(self, finished: list[FinishedRequestStats]) -> None:
        """Traces and tenant counters of finished sequences (only requests that have
        them: nothing per request with tracing and tenant metrics off)."""
        for f in finished:
            tr = self._traces.get(f.parent_id)
            if tr is not None:
                tr[0].seq_finished(f, tr[1])
            tenant = self._tenants.get(f.parent_id)
            if tenant is not None:
                self.metrics.http.record_tokens(
                    tenant, f.num_prompt_tokens, f.num_generation_tokens
                )
            lora = self._loras.get(f.parent_id)
            if lora is not None and self.lora_metrics is not None:
                self.lora_metrics.record_finished(
                    lora, f.finish_reason, f.num_prompt_tokens, f.num_generation_tokens
                )

    def _log_finished(self, finished: list[FinishedRequestStats]) -> None:
        if self._traces or self._tenants or self._loras:
            self._observe_finished(finished)
        if self.log_requests_json:
            for f in finished:
                request_logger.info(json.dumps(f.to_log_dict()))

    # ---------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
            try:
                await self._output_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.core is not None:
            self.core.shutdown()
