"""kvasir: a small, fast LLM inference engine and OpenAI-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvasir.engine.beam_search import BeamSearchParams
from kvasir.lora.request import LoRARequest
from kvasir.outputs import CompletionOutput, RequestOutput
from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "BeamSearchParams",
    "LoRARequest",
    "PoolingParams",
    "RequestOutput",
    "CompletionOutput",
    "RequestOutputKind",
    "__version__",
]

if TYPE_CHECKING:
    from kvasir.entrypoints.llm import LLM


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; import it only when used.
    if name == "LLM":
        from kvasir.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
