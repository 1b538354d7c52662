"""The ``ceilings`` part: the device's measured bf16 matmul peak and HBM copy bandwidth."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmark.gpu.device import Run


def part_ceilings(run: Run) -> dict[str, Any]:
    s = run.settings
    generator = torch.Generator(device=run.device).manual_seed(s.seed)
    n = s.matmul_n
    times = run.time_calls(_matmuls(run, n, generator), s.timed_reps, warmup=3)
    run.free()
    size = s.copy_mib * 2**20
    copies = run.time_calls(_copy(run, size, generator), s.timed_reps, warmup=3)
    run.free()
    flops = 2.0 * n**3
    matmul_s, copy_s = statistics.median(times), statistics.median(copies)
    return {
        "matmul_n": n,
        "matmul_dtype": s.dtype,
        "matmul_ms": matmul_s * 1e3,
        "matmul_tflops": flops / matmul_s / 1e12,
        "matmul_tflops_best": flops / min(times) / 1e12,
        "copy_bytes": 2 * size,
        "copy_ms": copy_s * 1e3,
        "copy_gbps": 2 * size / copy_s / 1e9,
        "copy_gbps_best": 2 * size / min(copies) / 1e9,
        "timing": "CUDA events, median of timed reps after warm-up" if run.cuda else "host clock (CPU)",
    }


def _matmuls(run: Run, n: int, generator: torch.Generator) -> Callable[[], None]:
    """Square products over three operand sets in turn, so none finds its inputs in the L2 the previous
    one left; random data (zeros run faster than real data on these chips)."""

    def matrix() -> torch.Tensor:
        return torch.randn(n, n, dtype=run.dtype, device=run.device, generator=generator)

    operands = [(matrix(), matrix()) for _ in range(3)]
    out = torch.empty(n, n, dtype=run.dtype, device=run.device)
    turn = iter(range(1 << 62))

    def matmul() -> None:
        a, b = operands[next(turn) % len(operands)]
        torch.matmul(a, b, out=out)

    return matmul


def _copy(run: Run, size: int, generator: torch.Generator) -> Callable[[], Any]:
    source = torch.empty(size, dtype=torch.uint8, device=run.device).random_(generator=generator)
    target = torch.empty_like(source)
    return lambda: target.copy_(source)
