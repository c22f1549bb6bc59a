"""HF ``architectures`` name -> kvasir model class."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kvasir.models.llama import LlamaForCausalLM
from kvasir.models.mamba import JambaForCausalLM, MambaForCausalLM
from kvasir.models.moe import MoeForCausalLM

# SmolLM2 and Llama 2/3.x checkpoints all say "LlamaForCausalLM".
_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
    "MambaForCausalLM": MambaForCausalLM,
    "Mamba2ForCausalLM": MambaForCausalLM,
    "JambaForCausalLM": JambaForCausalLM,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_cls(architectures: Sequence[str]) -> type[nn.Module]:
    """The class for the first supported name in ``architectures`` (an HF config's
    ``architectures`` list). Raises ValueError listing the supported ones otherwise."""
    for arch in architectures:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"model architecture(s) {list(architectures)} not supported; "
        f"supported architectures: {list(SUPPORTED_ARCHITECTURES)}"
    )
