"""Small helpers over HF tokenizers (loading lives in ``kvasir.models.loader``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kvasir.config import ModelArchConfig


def get_eos_token_ids(
    tokenizer: PreTrainedTokenizerBase | None, arch_config: ModelArchConfig
) -> tuple[int, ...]:
    """Token ids that end generation: the model config's (config.json plus
    generation_config.json, or GGUF metadata) followed by the tokenizer's eos, deduplicated."""
    ids = list(arch_config.eos_token_id)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(eos, int):
        ids.append(eos)
    return tuple(dict.fromkeys(ids))


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template. Extra
    keyword arguments reach the template (e.g. ``enable_thinking`` for Qwen3)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template")
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
    )
    # transformers 5 returns a BatchEncoding; 4.x a plain list.
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]
