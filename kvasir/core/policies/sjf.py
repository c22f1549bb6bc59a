"""``sjf``: shortest predicted job first, with aging and the age bound.

A request's job is its prompt plus its predicted output (``OutputLengthPredictor``);
output tokens are weighted by how many prompt tokens a decode step could have
prefilled instead (one step per output token). Each second a request waits takes
``sjf_aging_tokens_per_s`` off its key, and past ``policy_age_bound_s`` it goes first.
The running request with the longest predicted remaining output is preempted first.
"""

from __future__ import annotations

from kvasir.config import SchedulerConfig
from kvasir.core.kv_cache_manager import KVCacheManager
from kvasir.core.policies.base import AgedPolicy
from kvasir.core.policies.length_predictor import OutputLengthPredictor
from kvasir.core.request import Request, RequestStatus


class SJFPolicy(AgedPolicy):
    name = "sjf"

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        super().__init__(config, kv)
        self.predictor = OutputLengthPredictor()

    def on_add(self, request: Request) -> None:
        request.predicted_output_tokens = self.predictor.predict(request)

    def _remaining(self, request: Request) -> int:
        predicted = request.predicted_output_tokens or 0
        return max(predicted - request.num_output_tokens, 0)

    def order_key(self, request: Request) -> tuple:
        # Prefill tokens cost a fraction of a step each; a decode token a whole step.
        cost = request.num_prompt_tokens / self.config.max_num_batched_tokens
        cost += self._remaining(request)
        waited = max(self.now - request.arrival_time, 0.0)
        return (cost - self.config.sjf_aging_tokens_per_s * waited,)

    def select_victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: (self._remaining(r), r.arrival_seq))

    def on_finished(self, request: Request) -> None:
        if request.status != RequestStatus.FINISHED_ABORTED:
            self.predictor.observe(request, request.num_output_tokens)
