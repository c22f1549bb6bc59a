"""``POST /v1/embeddings``: pooled final hidden states of any loaded model.

Each input is one prefill-only engine request (``PoolingParams``), batched by the
engine with everything else that runs. Pooling is the last token's hidden state by
default (``--pooling-type MEAN``: the mean over the prompt; ``pooling_type`` per request
as an extra), L2-normalised unless ``normalize`` is false. ``dimensions`` truncates
(then normalises) only for models declared Matryoshka-trained with
``--matryoshka-dimensions``; otherwise it is refused.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Literal

import numpy as np
from fastapi import Request
from pydantic import Field
from starlette.responses import JSONResponse, Response

from kvasir.engine.async_llm import EngineDeadError, RequestRejectedError
from kvasir.entrypoints.openai.errors import bad_request, from_value_error
from kvasir.entrypoints.openai.protocol import OpenAIModel
from kvasir.entrypoints.openai.serving_common import (
    ClientDisconnected,
    ServingContext,
    until_disconnect,
)
from kvasir.pooling_params import POOLING_TYPES, PoolingParams
from kvasir.sampling_params import SamplingParams

_PARAMS = {"input", "dimensions", "encoding_format", "pooling_type", "model"}


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A string, a list of strings, a token-id list or a list of them."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Matryoshka truncation.")
    user: str | None = None
    # vLLM / kvasir extras
    pooling_type: Literal["LAST", "MEAN", "last", "mean"] | None = None
    normalize: bool = True
    priority: int = 0


def parse_matryoshka(value: str | None) -> list[int] | None:
    """``--matryoshka-dimensions``: "64,128,256" (those sizes) or "any" ([] = any size)."""
    if value is None or value == "":
        return None
    if value.strip().lower() == "any":
        return []
    try:
        dims = sorted({int(x) for x in value.split(",")})
    except ValueError:
        raise ValueError(
            f"--matryoshka-dimensions must be 'any' or integers like 64,128, got {value!r}"
        ) from None
    if any(d < 1 for d in dims):
        raise ValueError(f"--matryoshka-dimensions must be positive, got {value!r}")
    return dims


def _inputs(value: str | list) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise bad_request("input must not be empty", "input")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return [list(value)]
    return list(value)


def encode_embedding(vec: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as the OpenAI API sends it
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return vec


class OpenAIServingEmbedding:
    def __init__(
        self,
        ctx: ServingContext,
        pooling_type: str = "LAST",
        matryoshka_dimensions: list[int] | None = None,
    ) -> None:
        self.ctx = ctx
        self.pooling_type = pooling_type.upper()
        self.matryoshka = matryoshka_dimensions
        self.hidden_size = ctx.engine.model_info.hidden_size

    def _check_dimensions(self, dims: int | None) -> None:
        if dims is None:
            return
        if self.matryoshka is None:
            raise bad_request(
                "dimensions is not supported by this model: it is not declared "
                "Matryoshka-trained (start the server with --matryoshka-dimensions)",
                "dimensions",
            )
        if dims < 1 or dims > self.hidden_size:
            raise bad_request(
                f"dimensions must be in [1, {self.hidden_size}] (the model's hidden size), "
                f"got {dims}",
                "dimensions",
            )
        if self.matryoshka and dims not in self.matryoshka:
            raise bad_request(
                f"dimensions must be one of {self.matryoshka} for this model, got {dims}",
                "dimensions",
            )

    async def create_embedding(self, req: EmbeddingRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        engine = ctx.engine
        lora = ctx.check_model(req.model)
        self._check_dimensions(req.dimensions)
        pooling_type = (req.pooling_type or self.pooling_type).upper()
        assert pooling_type in POOLING_TYPES
        pp = PoolingParams(pooling_type, req.normalize, req.dimensions)
        inputs = _inputs(req.input)
        prompt_ids: list[list[int]] = []
        for i, p in enumerate(inputs):
            try:
                _, ids = engine.input_processor.tokenize(p)
            except ValueError as e:
                err = from_value_error(e, _PARAMS, {"prompt": "input"})
                err.param = f"input[{i}]" if len(inputs) > 1 else "input"
                raise err from None
            if len(ids) + 1 > ctx.max_model_len:
                raise bad_request(
                    f"This model's maximum context length is {ctx.max_model_len} tokens, "
                    f"but input {i} has {len(ids)} tokens.",
                    f"input[{i}]" if len(inputs) > 1 else "input",
                    "context_length_exceeded",
                )
            prompt_ids.append(ids)
        request_id = f"embd-{uuid.uuid4().hex}"

        async def one(i: int, ids: list[int]) -> list[float]:
            last = None
            gen = ctx.generate(
                raw_request, ids, SamplingParams(max_tokens=1), f"{request_id}-{i}",
                model=req.model, priority=req.priority, pooling_params=pp, lora_request=lora,
            )  # fmt: skip
            try:
                async for out in gen:
                    last = out
            finally:
                await gen.aclose()
            assert last is not None and last.pooled_output is not None
            return last.pooled_output

        async def all_inputs() -> list[list[float]]:
            tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(prompt_ids)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()

        try:
            vectors = await until_disconnect(all_inputs(), raw_request)
        except ClientDisconnected:
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            raise ctx.engine_error(e, {"prompt": "input"}) from None
        num_prompt = sum(len(p) for p in prompt_ids)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": encode_embedding(v, req.encoding_format),
                    }
                    for i, v in enumerate(vectors)
                ],
                "model": ctx.served_model_name,
                "usage": {"prompt_tokens": num_prompt, "total_tokens": num_prompt},
            }
        )
