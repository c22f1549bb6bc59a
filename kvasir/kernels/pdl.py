"""Programmatic dependent launch (PDL) for the kernels of a decode step (Hopper on).

A batch-1 decode step of an 8B model is ~300 short kernels in a row. Without PDL each
one starts only after the previous one has fully drained, then ramps its own programs
up: a few microseconds per boundary in which the memory system idles. With PDL (CUDA's
programmatic stream serialisation, ``griddepcontrol`` in PTX) a kernel is launched while
its predecessor still runs:

* every kernel calls ``gdc_launch_dependents`` first, which lets the next kernel's
  programs be scheduled as soon as all of this kernel's programs have started;
* every kernel calls ``gdc_wait`` before it reads anything an earlier kernel may have
  written and before it writes anything (``griddepcontrol.wait`` returns only once the
  preceding grid has completed and its memory is visible, and, since every kernel
  waits before it can complete, once all earlier grids have);
* only reads of data no kernel writes may come before the wait: the GEMV loads its
  first weight tile there, so the weight stream of the next projection starts while
  the norm or attention kernel in front of it still runs.

Kernels launched without the attribute (torch's) order as usual. Each wrapper takes
``pdl``, which the layers pass from ``KernelConfig.pdl`` (``--no-pdl``, or
``KVASIR_PDL=0`` read once into that config, turns it off); the interpreter and GPUs
before compute capability 9.0 never use it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton.language as tl

try:  # triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAVE_GDC = True
except ImportError:  # pragma: no cover - older triton: the constexpr branch is never taken
    _HAVE_GDC = False

    @tl.core.extern
    def gdc_wait(_semantic=None):  # type: ignore[no-redef]
        raise RuntimeError("programmatic dependent launch needs triton >= 3.3")

    @tl.core.extern
    def gdc_launch_dependents(_semantic=None):  # type: ignore[no-redef]
        raise RuntimeError("programmatic dependent launch needs triton >= 3.3")


@functools.cache
def _supported(device_index: int) -> bool:
    """Whether this triton and this GPU can launch with PDL (checked once per device)."""
    if not _HAVE_GDC or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor, requested: bool = True) -> bool:
    """Whether a kernel working on ``t``'s device launches with PDL: ``requested`` (the
    caller's ``KernelConfig.pdl``) and supported there."""
    return requested and t.is_cuda and _supported(t.device.index or 0)


def launch_kwargs(pdl: bool) -> dict[str, Any]:
    """The launch option for a kernel call (none at all when off: the interpreter's
    launcher takes no such keyword)."""
    return {"launch_pdl": True} if pdl else {}


__all__ = ["gdc_launch_dependents", "gdc_wait", "launch_kwargs", "use_pdl"]
