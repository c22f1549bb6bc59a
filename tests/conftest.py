"""Session-wide test setup.

Without a CUDA GPU, Triton kernels can only run under Triton's CPU interpreter, and
``TRITON_INTERPRET`` is read when ``triton`` itself is first imported (its standard
library, ``tl.cdiv`` and friends, is built for one mode or the other) as well as when
each ``@triton.jit`` kernel is decorated. Some layers import their kernel modules
eagerly (the KV-cache quantisation helpers, the quantised GEMMs, the Mamba kernels), so
any test module may import ``triton`` first: set the variable before anything does.
Subprocesses (servers started by tests) inherit it; their CPU paths never run Triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
