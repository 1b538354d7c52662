"""The modelled hardware and job, and ``Roofline``: how long a decode step or a finetune unit takes on it.

Step latency: a roofline. A decode step reads the weights (all 32 layers and the LM head; the embedding
row gather is negligible) and every KV token of the batch once:
``t = max(bytes / (B * eta_B), flops / (P * eta_P)) + t0``, flops = 2 x params x batch + attention
(4 x hidden x context x layers). A finetune unit is compute-bound (arithmetic intensity = its tokens,
about 1024 FLOP/byte, far above the H100's ~300 ridge point): ``t = max(flops / (P * eta_P * s),
bytes / (B * eta_B)) + t_launch`` on a share ``s`` of the SMs. Forward flops: 2 x (layer + LoRA
params) x tokens + attention 2 x hidden x seq_len x tokens (causal); backward with a frozen base needs only
input gradients (the same GEMM flops), plus the LoRA weight gradients and twice the attention; the loss
unit is the LM head forward and input-gradient over target tokens; the optimizer reads and writes the
LoRA weights, gradients and AdamW moments (fp32, 32 bytes a parameter) once.

Interference while co-running on a split holding a share ``f`` of the SMs: the decode step's kernels get
the other ``1 - f``. Memory-bound kernels saturate HBM with about half the SMs, so decode bandwidth scales
by ``min(1, (1 - f) / sigma)``; the finetune GEMMs draw ``f * P * eta_P / tokens`` bytes/s of bandwidth,
taken from decode's; decode compute scales by ``1 - f``; L2 and scheduler contention add ``kappa``.
Finetune on ``f`` of the SMs runs at ``f`` of the compute. Each decode step and unit is multiplied by a
log-normal jitter (seeded; applied by ``loop.Instance``).

Constants (H100 SXM 80GB, LLaMA3-8B, bf16):
- P = 989e12 FLOP/s dense bf16, B = 3.35e12 B/s HBM3, 132 SMs, 80e9 B: NVIDIA H100 SXM datasheet.
- LLaMA3-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads (head dim 128), intermediate 14336, vocab
  128256, untied LM head: Meta's ``config.json``. 8.03e9 parameters, 15.0 GB read per decode step,
  128 KiB of KV per token.
- eta_B = 0.80 (achieved fraction of peak bandwidth for GEMV/paged-attention kernels) and eta_P = 0.70
  (cuBLAS bf16 GEMMs at these sizes reach roughly 650-750 TFLOP/s): assumptions from commonly reported
  H100 microbenchmarks, not measured here.
- t0 = 1.0 ms per decode step (sampling, scheduling, CUDA-graph launch): assumption; with it batch 1 at
  1k context takes 6.7 ms, in line with published LLaMA3-8B H100 inter-token latencies.
- t_launch = 50 us per finetune unit (a layer's ~10 kernels at ~5 us each): assumption.
- sigma = 0.5 (SM share that saturates HBM for memory-bound kernels) and kappa = 0.05 (cache and
  scheduling contention): assumptions; the GPU co-location benchmark is where they would be measured.
- Jitter: log-normal, sigma 2% for decode steps and 3% for units: assumption.
- KV pool: 85% of HBM static (SGLang's ``mem_fraction_static`` is of that order on 80 GB) less the
  weights: about 404k tokens. Saved activations of a LoRA step (no recomputation): 8 x hidden + 4 x
  intermediate bf16 values per token and layer (norm inputs/outputs, q/k/v/attention outputs, gate, up,
  activation and product): an estimate.
- Finetune job: LoRA r=16 on all seven projections (42M trainable parameters), micro-batches of 2 x 512
  tokens, 4 micro-batches per optimizer step, one layer per unit (the server's default).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import msgspec

from sglang_harli.core.colocation.work import FinetuneWork

if TYPE_CHECKING:
    from benchmark.simulate.workload import Workload


class ModelShape(msgspec.Struct, frozen=True, kw_only=True):
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 128256
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * self.hidden + 2 * kv) + 3 * self.hidden * self.intermediate

    @property
    def decode_params(self) -> int:
        """What one decode step multiplies by: every layer and the LM head."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def lora_params_per_layer(self, rank: int) -> int:
        kv = self.kv_heads * self.head_dim
        shapes = [
            (self.hidden, self.hidden),
            (self.hidden, kv),
            (self.hidden, kv),
            (self.hidden, self.hidden),
        ]
        shapes += [(self.hidden, self.intermediate)] * 2 + [(self.intermediate, self.hidden)]
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)

    @property
    def activation_bytes_per_token_layer(self) -> int:
        return (8 * self.hidden + 4 * self.intermediate) * self.dtype_bytes


class Gpu(msgspec.Struct, frozen=True, kw_only=True):
    name: str = "H100 SXM 80GB"
    peak_flops: float = 989e12
    bandwidth: float = 3.35e12
    sms: int = 132
    memory_bytes: float = 80e9
    compute_capability: tuple[int, int] = (9, 0)


class Assumptions(msgspec.Struct, frozen=True, kw_only=True):
    bandwidth_efficiency: float = 0.80
    matmul_efficiency: float = 0.70
    step_overhead_s: float = 1.0e-3
    unit_launch_s: float = 50e-6
    saturating_sm_share: float = 0.5
    cache_interference: float = 0.05
    decode_jitter: float = 0.02
    unit_jitter: float = 0.03
    mem_fraction_static: float = 0.85


class FinetuneSetup(msgspec.Struct, frozen=True, kw_only=True):
    rank: int = 16
    sequences: int = 2
    seq_len: int = 512
    accumulation: int = 4
    target_share: float = 0.5
    """Share of tokens that carry a loss (the completion half)."""

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


class Roofline:
    """Latencies of decode steps and finetune units on the modelled GPU (see the module docstring)."""

    def __init__(self, model: ModelShape, gpu: Gpu, assume: Assumptions, finetune: FinetuneSetup):
        self.model, self.gpu, self.assume, self.finetune = model, gpu, assume, finetune
        self.bandwidth = gpu.bandwidth * assume.bandwidth_efficiency
        self.flops = gpu.peak_flops * assume.matmul_efficiency
        self.weight_bytes = model.decode_params * model.dtype_bytes
        self._units: dict[tuple[FinetuneWork, float], float] = {}

    @property
    def kv_pool_tokens(self) -> int:
        static = self.gpu.memory_bytes * self.assume.mem_fraction_static - self.weight_bytes
        return int(static // self.model.kv_bytes_per_token)

    @property
    def activation_tokens(self) -> int:
        """KV tokens lent to one micro-batch for its saved activations."""
        m = self.model
        need = self.finetune.tokens * m.layers * m.activation_bytes_per_token_layer
        return math.ceil(need / m.kv_bytes_per_token)

    def decode_s(self, batch: int, context_tokens: int, finetune_share: float = 0.0) -> float:
        """One decode step; ``finetune_share`` of the SMs held by finetune work running beside it."""
        m, a = self.model, self.assume
        bytes_ = self.weight_bytes + context_tokens * m.kv_bytes_per_token
        flops = 2 * m.decode_params * batch + 4 * m.hidden * context_tokens * m.layers
        bandwidth, compute, slowdown = self.bandwidth, self.flops, 1.0
        if finetune_share > 0:
            left = 1.0 - finetune_share
            drawn = finetune_share * self.flops / self.finetune.tokens  # finetune's own HBM traffic
            bandwidth = min(1.0, left / a.saturating_sm_share) * max(
                self.bandwidth - drawn, 0.1 * self.bandwidth
            )
            compute, slowdown = self.flops * left, 1.0 + a.cache_interference
        return max(bytes_ / bandwidth, flops / compute) * slowdown + a.step_overhead_s

    def unit_flops(self, work: FinetuneWork) -> tuple[float, float]:
        """(FLOPs, bytes) of one unit."""
        m, f = self.model, self.finetune
        lora = m.lora_params_per_layer(f.rank)
        if work.kind in ("forward", "backward"):
            linear = 2 * (m.layer_params + lora) * work.tokens
            attention = 2 * m.hidden * f.seq_len * work.tokens
            if work.kind == "backward":  # input grads (frozen base), LoRA weight grads, attention x2
                linear += 2 * lora * work.tokens
                attention *= 2
            bytes_ = m.layer_params * m.dtype_bytes
            return work.layers * (linear + attention), work.layers * bytes_
        if work.kind == "loss":
            targets = work.tokens * f.target_share
            return 2 * 2 * m.vocab * m.hidden * targets, m.vocab * m.hidden * m.dtype_bytes
        return 0.0, 32.0 * work.params  # optimizer: fp32 weights, grads and two moments, read + write

    def unit_s(self, work: FinetuneWork, share: float = 1.0) -> float:
        key = (work, share)
        if key not in self._units:
            flops, bytes_ = self.unit_flops(work)
            self._units[key] = (
                max(flops / (self.flops * share), bytes_ / self.bandwidth) + self.assume.unit_launch_s
            )
        return self._units[key]

    def saturation_rate(self, workload: Workload, slo_s: float) -> float:
        """Arrivals/s at which the steady-state batch fills the KV pool or the step reaches the SLO."""
        prompt, output = workload.mean_lengths()
        by_memory = self.kv_pool_tokens / (prompt + output)
        batch = by_memory
        while batch > 1 and self.decode_s(round(batch), round(batch * (prompt + output / 2))) > slo_s:
            batch *= 0.98
        step = self.decode_s(round(batch), round(batch * (prompt + output / 2)))
        return batch / (output * step)
