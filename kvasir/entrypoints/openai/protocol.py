"""Request and response bodies of the OpenAI-compatible API (pydantic: they validate
requests and generate ``/openapi.json``).

Field names follow the OpenAI API; the extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``cache_salt``, ...) follow vLLM, so the same ``extra_body`` works against both.
Ranges are checked here and again by ``SamplingParams``; either error names the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvasir.engine.messages import SchedulingHints

_MAX_LOGPROBS = 20
_INT64 = 2**63


class OpenAIModel(BaseModel):
    # Unknown fields are accepted and ignored, as by vLLM: clients send OpenAI fields
    # that do not apply to a local model (store, metadata, service_tier, ...).
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- shared


class JsonSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    # "schema" would shadow a pydantic BaseModel attribute: the alias keeps the wire name.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="Served model name; default: the only one.")
    n: int = Field(1, ge=1, le=128, description="Number of choices to generate.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, description="Default 1.0; 0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, description="-1 disables.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    cache_salt: str | None = Field(
        None,
        description="Prefix-cache isolation: requests with different salts never "
        "share cached KV blocks.",
    )
    priority: int = Field(0, description="Lower is served first (--scheduling-policy priority).")
    # Scheduling classes (OpenAI's field name; kvasir's classes interactive / batch, and
    # OpenAI's values auto / default / priority = interactive, flex = batch) and SLOs.
    service_tier: Literal["auto", "default", "flex", "priority", "interactive", "batch"] | None = (
        Field(None, description="interactive (default) or batch: the class's default SLOs.")
    )
    ttft_slo_ms: float | None = Field(
        None, gt=0, description="Time-to-first-token SLO (--scheduling-policy slo)."
    )
    tpot_slo_ms: float | None = Field(
        None, gt=0, description="Time-per-output-token SLO (--scheduling-policy slo)."
    )

    def scheduling_hints(self) -> SchedulingHints:
        """What the scheduling policy reads; the tenant is OpenAI's ``user`` for now."""
        return SchedulingHints(
            tenant=self.user,
            service_tier=self.service_tier,
            ttft_slo_ms=self.ttft_slo_ms,
            tpot_slo_ms=self.tpot_slo_ms,
        )

    allowed_token_ids: list[int] | None = Field(None, description="Only these may be sampled.")
    bad_words: list[str] | None = Field(None, description="Words that are never generated.")
    use_beam_search: bool = Field(False, description="Beam search with n beams (vLLM).")
    length_penalty: float = Field(1.0, description="Beam search: score / length**penalty.")
    # Structured outputs (kvasir.structured_output): OpenAI's response_format, vLLM's
    # structured_outputs object and its older guided_* fields. At most one applies.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM: one of json, json_object, regex, choice, grammar."
    )
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = Field(None, description="Ignored (xgrammar).")


# ---------------------------------------------------------------- completions


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="A string, a list of strings, a token-id list or a list of them."
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=_MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=_MAX_LOGPROBS)
    best_of: int | None = Field(
        None, ge=1, le=128, description="Candidates sampled (>= n); the n best are returned."
    )
    suffix: str | None = Field(None, description="Not supported (must be null).")


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One ``data:`` event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- chat


class ChatContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: calls it made
    tool_call_id: str | None = None  # tool: the call this answers
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated alias of max_completion_tokens."
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=_MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(
        None, description='Function tools: [{"type": "function", "function": {...}}].'
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", ...}.'
    )
    parallel_tool_calls: bool = True
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template for this request (vLLM); refused unless the server "
        "runs with --trust-request-chat-template. Rendered sandboxed, with limits.",
    )


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- misc endpoints


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvasir"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter: the base model it runs on
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: str = "ok"
