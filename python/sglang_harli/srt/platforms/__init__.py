"""SGLang platform plugins shipped by sglang-harli (entry-point group ``sglang.srt.platforms``).

The activate functions are what SGLang's discovery calls: they must be cheap, import nothing heavy, and
return the platform class path only on hardware the platform serves.
"""

from __future__ import annotations

import os

CPU_PLATFORM_NAME = "harli_cpu"
CPU_PLATFORM_CLASS = "sglang_harli.srt.platforms.cpu.HarliCpuPlatform"


def activate_cpu() -> str | None:
    """Select the pure-torch CPU platform when no accelerator can serve, or when named explicitly.

    SGLang's discovery calls this only when ``SGLANG_PLATFORM`` is unset or names us. It never activates
    on a CUDA machine unless asked for by name, so installing sglang-harli leaves GPU servers untouched.
    """
    if os.environ.get("SGLANG_PLATFORM") == CPU_PLATFORM_NAME:
        return CPU_PLATFORM_CLASS
    import torch

    if torch.cuda.is_available():
        return None
    for backend in ("xpu", "npu", "mps"):
        module = getattr(torch, backend, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            return None
    return CPU_PLATFORM_CLASS
