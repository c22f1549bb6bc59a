"""Built-in architecture configs and random weights, for benchmarks and tests without a
checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_INIT_STD = 0.02


def available_dummy_configs() -> list[str]:
    """Names of the built-in configs (``kvasir/models/configs/<name>.json``)."""
    return sorted(f[: -len(".json")] for f in os.listdir(_CONFIG_DIR) if f.endswith(".json"))


def dummy_config_path(name: str) -> str | None:
    """Path of built-in config ``name``'s HF-format ``config.json``, or None."""
    if name not in available_dummy_configs():
        return None
    return os.path.join(_CONFIG_DIR, f"{name}.json")


def is_builtin_dummy_config(path: str) -> bool:
    return os.path.dirname(os.path.abspath(path)) == _CONFIG_DIR


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights through the model's own loader: norm weights 1, everything else
    N(0, 0.02), which keeps activations finite through 80 layers. Each full checkpoint
    tensor is drawn on the model's device (no host round trip) from one generator in a
    fixed order and then sharded by the weight loaders, so every tensor-parallel rank
    and pipeline stage holds its part of the same model as a single process."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in model.expected_weight_shapes().items():  # type: ignore[operator]
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=dtype, device=device)
            else:
                t = torch.empty(shape, dtype=dtype, device=device)
                yield name, t.normal_(0.0, _INIT_STD, generator=gen)

    model.load_weights(tensors())  # type: ignore[operator]
