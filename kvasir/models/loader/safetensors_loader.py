"""Stream tensors out of (possibly sharded) HF safetensors checkpoints."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from kvasir.models.loader.hf_config import read_json

_INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint shards of ``model_dir``: those named by
    ``model.safetensors.index.json`` if present, else every ``*.safetensors`` file."""
    index_path = os.path.join(model_dir, _INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"'{index_path}' has no weight_map")
        files = [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise ValueError(f"safetensors shard '{f}' named in '{index_path}' does not exist")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in '{model_dir}'")
    return files


def iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time from memory-mapped files, so at most
    one tensor is materialised in host memory beyond the mapping. A corrupt or truncated
    file raises ValueError naming it."""
    for path in files:
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"corrupt or unreadable safetensors file '{path}': {e}") from e
        with handle as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise ValueError(
                        f"corrupt safetensors file '{path}' (tensor {name!r}): {e}"
                    ) from e
                yield name, tensor
