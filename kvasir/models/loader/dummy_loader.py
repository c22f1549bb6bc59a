"""Built-in architecture configs and random weights, for benchmarks and tests without a
checkpoint."""

from __future__ import annotations

import os

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
    """Fill every parameter in place on its own device (no host round trip): norm weights
    1, everything else N(0, 0.02), which keeps activations finite through 80 layers."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device)
            gen.manual_seed(seed)
        param.normal_(0.0, _INIT_STD, generator=gen)
