"""Kernel tests run under Triton's CPU interpreter when no CUDA GPU is present.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it must be set
before ``kvasir.kernels`` is imported. If some earlier test module already imported the
kernels compiled-mode on a CPU-only machine (where they could not run anyway), reload
them interpreted. The variable stays set for the rest of the session; other tests do not
use Triton, and any that did could only run interpreted on a CPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    _stale = sorted(
        (n for n in sys.modules if n.startswith("kvasir.kernels.")),
    ) + [n for n in ("kvasir.attention.triton_backend",) if n in sys.modules]
    for _name in _stale:
        importlib.reload(sys.modules[_name])
