"""A pure-torch CPU platform for SGLang: serve any Llama/Qwen-style checkpoint with no accelerator.

SGLang's in-tree CPU path (``SGLANG_USE_CPU_ENGINE=1``) calls sgl-kernel's CPU operators, which PyPI does
not ship. Declaring ourselves an out-of-tree platform instead sends every layer through its torch-native
implementation, and the attention through the ``torch_native`` backend: slow, but correct everywhere,
which is what tests, laptops and CI need.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import psutil
import torch
from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.interface import PlatformCapabilities, PlatformEnum, SRTPlatform

# A CPU has no HBM to fill: SGLang's "use most of free memory for KV" rule would commit most of the RAM.
# The KV pool defaults to this many tokens instead (plenty for laptop-scale models; raise it with
# --max-total-tokens). Kept as a token count so it means the same for every model.
DEFAULT_CPU_MAX_TOTAL_TOKENS = 65536

_PINNING_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "empty_strided")


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2, then v1), or None where there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            return int(raw)
    return None


def _cgroup_usage_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _drop_pin_memory(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    wrapper._harli_unpinned = True
    return wrapper


def disable_pinned_memory() -> None:
    """Make host-memory pinning a no-op in this process.

    SGLang's LoRA layers and backends stage index tensors in pinned memory unconditionally, and pinning
    needs a CUDA driver. On a CPU-only machine "pinned" and "pageable" are the same memory, so dropping the
    request is exact. Idempotent; only ever called by the CPU platform, never on an accelerator.
    """
    for name in _PINNING_FACTORIES:
        factory = getattr(torch, name)
        if not getattr(factory, "_harli_unpinned", False):
            setattr(torch, name, _drop_pin_memory(factory))
    if not getattr(torch.Tensor.pin_memory, "_harli_unpinned", False):

        def pin_memory(self, device=None):
            return self

        pin_memory._harli_unpinned = True
        torch.Tensor.pin_memory = pin_memory


def cores_per_rank(ranks: int) -> str:
    """SGLang's CPU thread binding for ``ranks`` ranks: this process's cores split into equal blocks.

    Unset, SGLang binds one rank per NUMA node and refuses more ranks than nodes, so ``--tp-size 2`` on a
    one-node laptop would not start. With fewer cores than ranks, ranks share cores."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // ranks)
    blocks = [cores[(i * per) % len(cores) : (i * per) % len(cores) + per] for i in range(ranks)]
    return "|".join(",".join(map(str, block)) for block in blocks)


class HarliCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """Out-of-tree CPU platform: psutil/cgroup memory, torch-native kernels, no pinned memory."""

    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    capabilities = PlatformCapabilities()

    # -- memory: the smaller of the machine and the cgroup it runs in ------------------------------
    def get_device_total_memory(self, device_id: int = 0) -> int:
        total = int(psutil.virtual_memory().total)
        limit = _cgroup_limit_bytes()
        return min(total, limit) if limit else total

    def get_current_memory_usage(self, device=None) -> float:
        vm = psutil.virtual_memory()
        used = vm.total - vm.available
        usage = _cgroup_usage_bytes() if _cgroup_limit_bytes() else None
        return float(max(used, usage or 0))

    def get_available_memory(self, device_id: int = 0) -> tuple[int, int]:
        total = self.get_device_total_memory(device_id)
        return max(0, int(total - self.get_current_memory_usage())), total

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    # -- SGLang seams -------------------------------------------------------------------------------
    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "torch_native"

    def apply_server_args_defaults(self, server_args) -> None:
        """Fill what only a CPU needs, where the field is still unset (None).

        Flags with a non-None SGLang default (``--lora-backend``, ``--dtype``) cannot be told apart from a
        user's choice here; ``sglang_harli.launch_server`` fills those from the command line.
        """
        if getattr(server_args, "attention_backend", None) is None:
            server_args.attention_backend = "torch_native"
        if getattr(server_args, "sampling_backend", None) is None:
            server_args.sampling_backend = "pytorch"
        if getattr(server_args, "max_total_tokens", None) is None:
            server_args.max_total_tokens = DEFAULT_CPU_MAX_TOTAL_TOKENS
        ranks = getattr(server_args, "tp_size", 1) * getattr(server_args, "pp_size", 1)
        if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = cores_per_rank(ranks)

    def init_backend(self) -> None:
        disable_pinned_memory()
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
