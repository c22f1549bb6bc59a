"""``LoRARequest``: which adapter a request runs under (vLLM's fields and order)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """An adapter by name, a positive integer id (unique per adapter in one engine; 0 is
    the base model) and the directory holding its PEFT files (``adapter_config.json`` +
    ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_request.lora_name must be a non-empty string")
        if (
            isinstance(self.lora_int_id, bool)
            or not isinstance(self.lora_int_id, int)
            or self.lora_int_id < 1
        ):
            raise ValueError(
                f"lora_request.lora_int_id must be an integer >= 1 (0 is the base model), "
                f"got {self.lora_int_id!r}"
            )
