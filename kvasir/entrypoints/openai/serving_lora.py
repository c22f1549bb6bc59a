"""Adapters as models: a request's ``model`` names the base model or an adapter.

``LoRAModels`` holds the served adapters by name: those of ``--lora-modules`` (ids
1..n, as the engine core registers them), adapters found under ``--lora-dir`` when a
request first names them (the disk tier, loaded lazily), and adapters loaded at run
time through vLLM's ``POST /v1/load_lora_adapter`` (with
``--allow-runtime-lora-updating``). Every adapter is checked against the model (its
config and safetensors header, ``kvasir.lora.adapter.inspect_adapter``) before it is
served, so a bad one is a 400 at registration. Ids are never reused: an unloaded
adapter's id stays retired, so the engine core's caches can never serve stale weights
under a new name.
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from kvasir.config import LoRAConfig
from kvasir.entrypoints.openai.errors import OpenAIError, bad_request
from kvasir.lora.adapter import CONFIG_FILE, AdapterError, inspect_adapter
from kvasir.lora.request import LoRARequest


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class LoRAModels:
    def __init__(
        self,
        config: LoRAConfig,
        base_model_name: str,
        module_shapes: dict[str, list[int]],
        max_lora_rank: int,
    ) -> None:
        self.base_model_name = base_model_name
        self.lora_dir = config.lora_dir
        self.module_shapes = {k: (v[0], v[1]) for k, v in module_shapes.items()}
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[str, LoRARequest] = {}
        for i, (name, path) in enumerate(config.lora_modules):
            self.adapters[name] = LoRARequest(name, i + 1, path)
        self._next_id = len(config.lora_modules) + 1

    def names(self) -> list[str]:
        return [self.base_model_name, *self.adapters]

    def resolve(self, model: str) -> LoRARequest:
        """The adapter a request's ``model`` names; unknown: 400 naming ``model``."""
        lr = self.adapters.get(model)
        if lr is not None:
            return lr
        path = self._in_lora_dir(model)
        if path is not None:
            return self.load(model, path, param="model")
        raise OpenAIError(
            400,
            f"The model `{model}` does not exist: not the base model nor a served LoRA "
            f"adapter. Served: {', '.join(f'`{n}`' for n in self.names())}.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    def _in_lora_dir(self, name: str) -> str | None:
        if self.lora_dir is None or not name or name in (".", "..") or os.sep in name:
            return None
        path = os.path.join(self.lora_dir, name)
        return path if os.path.isfile(os.path.join(path, CONFIG_FILE)) else None

    def load(self, name: str, path: str, param: str = "lora_path") -> LoRARequest:
        """Check and register an adapter; 400 naming ``param`` when it cannot be served."""
        if not name:
            raise bad_request("lora_name must be a non-empty string", "lora_name")
        if name == self.base_model_name or name in self.adapters:
            raise bad_request(f"The LoRA adapter `{name}` has already been loaded.", "lora_name")
        try:
            inspect_adapter(path, self.module_shapes, self.max_lora_rank, f"adapter {name!r}")
        except AdapterError as e:
            raise bad_request(str(e), param) from None
        lr = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        self.adapters[name] = lr
        return lr

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise OpenAIError(
                404,
                f"The LoRA adapter `{name}` cannot be found.",
                "invalid_request_error",
                "lora_name",
                "model_not_found",
            )

    def model_cards(self, created: int) -> list[dict]:
        return [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "kvasir",
                "root": lr.lora_path,
                "parent": self.base_model_name,
            }
            for name, lr in self.adapters.items()
        ]


def add_lora_routes(app, ctx, allow_runtime_updating: bool) -> None:  # noqa: ANN001
    """vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (only with
    ``--allow-runtime-lora-updating``; behind the API key like every inference path)."""
    if ctx.lora is None or not allow_runtime_updating:
        return
    from starlette.responses import PlainTextResponse

    models: LoRAModels = ctx.lora

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
        models.load(request.lora_name, request.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        lr = models.adapters.get(request.lora_name)
        if lr is not None and request.lora_int_id not in (None, lr.lora_int_id):
            raise bad_request(
                f"lora_int_id {request.lora_int_id} is not the id of `{request.lora_name}` "
                f"({lr.lora_int_id})",
                "lora_int_id",
            )
        models.unload(request.lora_name)
        return PlainTextResponse(
            f"Success: LoRA adapter '{request.lora_name}' removed successfully."
        )
