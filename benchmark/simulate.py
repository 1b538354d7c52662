"""Trace-driven simulation of one decode instance co-running LoRA finetuning. SIMULATED, not measured.

The paper's claim (finetune throughput +46.2% on average, up to +92%, over the baselines at equal decode
QoS) is about a LLaMA3-8B-class model decoding on an H100; a 2-core CPU cannot reach that regime. This
module replays seeded bursty request traces against a model of such an instance and drives, step by step,
the very objects the server runs: ``core.qos.make_policy`` (``harli`` and the ``idle-only``, ``naive``
and ``static`` baselines), ``core.predictor.LatencyPredictor`` (fed only with the simulated observations),
``core.colocation.CoLocation`` (the loop glue the scheduler uses, here on the simulated clock) and the SM
split menu ``core.partition.plan_splits`` builds on an H100. Only latencies are modelled; every decision
is the production code's.

The instance (a PD-disaggregated decode instance, as in the paper). Requests arrive with their prompt's
KV cache already computed (the transfer is not modelled); one joins the running batch at the next step
once the KV pool can hold its prompt and its whole output (SGLang's reservation, without its optimism).
Each decode step emits one token for every running request. Between two steps the policy may admit
finetune units: in the ``shared`` split they run before the step on the whole GPU (time-sharing), in an
``ft-X%`` split they run concurrently with the step, fenced to X% of the SMs, and the token interval ends
when both are done. With no request running the trainer gets idle slices of ``--harli-idle-train-ms``
(yielding at a unit boundary when a request arrives). Saved activations of the micro-batch in flight live
in lent KV pages: a micro-batch starts only when the free pool can lend them, and a request that needs
those pages back takes them, dropping the micro-batch (its progress is lost and replayed), as the
server's lending does. Client-side TPOT is the gap between consecutive tokens of a request; a request's
first token (from the prefill instance) and its wait for memory are TTFT, not TPOT.

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
log-normal jitter (seeded).

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
- Requests: prompt lengths log-normal (median 512, sigma 0.8, clipped to [32, 4096]), output lengths
  log-normal (median 192, sigma 0.8, clipped to [16, 1024]): assumed chat-like shapes, no dataset.
- Arrivals: Poisson, at twice the mean rate for the first third of every 30 s period and half of it
  otherwise. Load 1.0 is the rate at which the steady-state batch fills the KV pool (or the decode step
  reaches the SLO, whichever comes first).

Where the simulator has to play the engine, it does what the server does: a unit's observed time is its
run time on the split it ran in (``CoLocation.unit_done``, as ``srt.finetune`` reports it), the policy's
idle slices and the start-up unit profile are the server's, and a decode step that ran beside finetune work
does not train stage 1, and units are offered as ``srt`` offers them: even the first unit of a micro-batch
that cannot start for want of lendable pages (``--runnable-only`` offers only units that can start). Such
admitted units do not run, and ``CoLocation`` pairs the interval with the units that ran.
The baselines never consult the predictor, so under them it is not fed (that only saves time).

The ``static`` baseline is tuned offline the strongest way: for every load level, the largest number of
units per step that still holds the SLO on that very trace (a search over simulations). ``harli/shared``
is harli with SM partitions off (time-sharing only), to separate what the splits add from what adapting
per step adds. The gain is harli's finetune throughput over the best baseline (``idle-only``,
``static``, ``naive``) that holds the SLO, where harli holds it too. Not modelled: prefill (another
instance's), KV transfer time, CPU-side scheduling jitter, the time the policy itself takes, and finetune
work overlapping the next token interval.

    python -m benchmark.simulate --quick        # seconds
    python -m benchmark.simulate --json benchmark/results/simulate.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from sglang_harli.core.colocation import CoLocation
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.partition import DEFAULT_SHARES, plan_splits, sm_granularity
from sglang_harli.core.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.qos import make_policy
from sglang_harli.core.work import SHARED, FinetuneWork

PAPER_AVERAGE_GAIN = 0.462
PAPER_MAX_GAIN = 0.920
ATTAINMENT_TARGET = 0.99
PREDICTOR_FORGETTING = 0.995
"""The server's (``srt.finetune.PREDICTOR_FORGETTING``); a test keeps the two equal."""
BASELINES = ("idle-only", "static", "naive")


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


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    prompt_median: float = 512
    prompt_sigma: float = 0.8
    prompt_range: tuple[int, int] = (32, 4096)
    output_median: float = 192
    output_sigma: float = 0.8
    output_range: tuple[int, int] = (16, 1024)
    period_s: float = 30.0
    burst_factor: float = 2.0
    """Arrival rate in the burst (first third of each period) over the mean; quiet gets the rest."""

    def mean_lengths(self, samples: int = 200_000) -> tuple[float, float]:
        rng = np.random.default_rng(12345)
        prompts, outputs = self._lengths(rng, samples)
        return float(prompts.mean()), float(outputs.mean())

    def _lengths(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompts = rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, n)
        outputs = rng.lognormal(math.log(self.output_median), self.output_sigma, n)
        return (
            np.clip(np.round(prompts), *self.prompt_range).astype(int),
            np.clip(np.round(outputs), *self.output_range).astype(int),
        )

    def trace(self, seed: int, duration_s: float, mean_rate: float) -> list[Request]:
        """Seeded Poisson arrivals, bursty: ``burst_factor`` x the mean rate for a third of each period."""
        rng = np.random.default_rng(seed)
        burst = self.burst_factor * mean_rate
        quiet = max(mean_rate * (3 - self.burst_factor) / 2, 1e-9)
        times, now = [], 0.0
        while True:
            in_burst = (now % self.period_s) < self.period_s / 3
            now += rng.exponential(1.0 / (burst if in_burst else quiet))
            if now >= duration_s:
                break
            times.append(now)
        prompts, outputs = self._lengths(rng, len(times))
        return [
            Request(at_s=t, prompt=int(p), output=int(o))
            for t, p, o in zip(times, prompts, outputs, strict=True)
        ]


class Request(msgspec.Struct, array_like=True):
    at_s: float
    prompt: int
    output: int


class SimTrainer:
    """The unit stream ``LoraTrainer.peek`` announces (forward per layer, loss, backward per layer, an
    optimizer step every ``accumulation`` micro-batches), for ever; a dropped micro-batch is replayed."""

    def __init__(self, model: ModelShape, finetune: FinetuneSetup, peek: int):
        tokens, layers = finetune.tokens, model.layers
        micro = (
            [FinetuneWork(kind="forward", tokens=tokens, layers=1)] * layers
            + [FinetuneWork(kind="loss", tokens=tokens)]
            + [FinetuneWork(kind="backward", tokens=tokens, layers=1)] * layers
        )
        optimizer = FinetuneWork(
            kind="optimizer", params=model.layers * model.lora_params_per_layer(finetune.rank)
        )
        self.plan = micro * finetune.accumulation + [optimizer]
        self.tokens, self.units_per_micro_batch = tokens, len(micro)
        self.peek_count = peek
        self._ring = self.plan * (2 + peek // len(self.plan))
        self.position = 0
        self.micro_start: int | None = None
        """Position of the in-flight micro-batch's first unit; ``None`` between micro-batches."""
        self.trained_tokens = 0
        self.dropped = 0

    def peek(self) -> list[FinetuneWork]:
        start = self.position % len(self.plan)
        return self._ring[start : start + self.peek_count]

    def next_unit(self) -> FinetuneWork:
        return self.plan[self.position % len(self.plan)]

    @property
    def in_flight(self) -> bool:
        return self.micro_start is not None

    def advance(self) -> int:
        """Past the next unit; returns the tokens of the micro-batch it completed, if it completed one."""
        work = self.next_unit()
        if work.kind == "forward" and self.micro_start is None:
            self.micro_start = self.position
        self.position += 1
        following = self.next_unit()
        if work.kind == "backward" and following.kind != "backward":
            self.micro_start = None
            self.trained_tokens += self.tokens
            return self.tokens
        return 0

    def units_left_in_micro_batch(self) -> int:
        """Units up to and including the in-flight micro-batch's last backward."""
        count, position = 0, self.position
        while True:
            work = self.plan[position % len(self.plan)]
            following = self.plan[(position + 1) % len(self.plan)]
            count += 1
            if work.kind == "backward" and following.kind != "backward":
                return count
            position += 1

    def drop(self) -> None:
        """Its lent pages were taken back: the micro-batch in flight starts again from its first unit."""
        if self.micro_start is not None:
            self.position, self.micro_start = self.micro_start, None
            self.dropped += 1


class _Clock:
    """The simulated time, handed to ``CoLocation`` in place of ``time.perf_counter``."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Unobserved:
    """Stands in for the predictor under the baselines, whose decisions never consult it: feeding the real
    one there would only cost time (every unit refits it) and buy error figures nobody acts on."""

    def observe_solo(self, *args, **kwargs) -> None: ...

    def observe_unit(self, *args, **kwargs) -> None: ...

    def observe_corun(self, *args, **kwargs) -> None: ...

    def snapshot(self):
        return LatencyPredictor().snapshot()


class RunResult(msgspec.Struct, kw_only=True):
    policy: str
    load: float
    static_units: int | None
    finetune_tokens_per_s: float
    slo_attainment: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    decode_tokens_per_s: float
    mean_batch: float
    requests: int
    finished: int
    micro_batches_dropped: int
    lent_gb_mean: float
    """KV memory lent to the trainer, averaged over time (as seen at step boundaries)."""
    split_units: dict[str, int]
    """Units run beside decode steps, per SM split."""
    margin_ms: float | None
    predictor_solo_mape: float | None
    predictor_corun_mape: float | None


class _Batch:
    """The running requests, kept as totals: a step touches every request, so per-request state would
    make each step cost the batch size; a request's end is known when it joins."""

    def __init__(self):
        self.size = 0
        self.context = 0
        self.step = 0
        self._ending: dict[int, list[tuple[int, int]]] = {}  # step -> [(final context, reserved)]

    def join(self, request: Request) -> int:
        reserved = request.prompt + request.output
        self.size += 1
        self.context += request.prompt
        self._ending.setdefault(self.step + request.output, []).append(
            (request.prompt + request.output, reserved)
        )
        return reserved

    def advance(self) -> tuple[int, int]:
        """One decode step: every request gains a token; returns (requests finished, tokens released)."""
        self.step += 1
        self.context += self.size
        ended = self._ending.pop(self.step, [])
        for context, _ in ended:
            self.context -= context
        self.size -= len(ended)
        return len(ended), sum(reserved for _, reserved in ended)


class Instance:
    """One decode instance on the simulated clock, with a policy and a trainer."""

    def __init__(
        self,
        roofline: Roofline,
        policy: str,
        *,
        slo_s: float,
        static_units: int = 0,
        seed: int = 0,
        partitions: bool = True,
        offer_blocked: bool = True,
    ):
        self.roofline, self.slo_s, self.offer_blocked = roofline, slo_s, offer_blocked
        config, gpu = HarliConfig(), roofline.gpu
        shares = DEFAULT_SHARES if partitions else ()
        menu = plan_splits(gpu.sms, shares, sm_granularity(*gpu.compute_capability))
        self.splits = {split.name: split.share for split in menu}
        self.clock = _Clock()
        self.predictor = LatencyPredictor(forgetting=PREDICTOR_FORGETTING)
        self.policy = make_policy(
            policy,
            self.predictor,
            slo_s=slo_s,
            idle_budget_s=config.idle_train_ms / 1e3,
            percentile=config.slo_percentile,
            static_units=static_units,
            splits=list(self.splits),
        )
        fed = self.predictor if policy == "harli" else _Unobserved()
        self.colocation = CoLocation(fed, self.policy, slo_s=slo_s, clock=self.clock)  # type: ignore[arg-type]
        peek = min(4 * (2 * roofline.model.layers + 1) + 1, 256)  # what ``FinetuneService.upcoming`` offers
        self.trainer = SimTrainer(roofline.model, roofline.finetune, peek=peek)
        self.rng = np.random.default_rng(seed)
        self.free = roofline.kv_pool_tokens
        """Pool tokens neither reserved by a request nor lent."""
        self.lent = 0
        self.split_units = dict.fromkeys(self.splits, 0)
        if policy == "harli":
            self._profile()

    def _profile(self) -> None:
        """The server's start-up profile: every unit of a micro-batch on the whole GPU, at two sizes."""
        for sequences in (1, 2):
            setup = msgspec.structs.replace(self.roofline.finetune, sequences=sequences)
            for work in SimTrainer(self.roofline.model, setup, peek=1).plan:
                seconds = self._jitter(self.roofline.unit_s(work), self.roofline.assume.unit_jitter)
                self.predictor.observe_unit(work, seconds)

    def _jitter(self, seconds: float, sigma: float) -> float:
        return seconds * float(self.rng.lognormal(0.0, sigma))

    # -- finetune units --------------------------------------------------------------------------------
    def _offer(self) -> list[FinetuneWork]:
        """The coming units, up to the first that could not start now for want of pages to lend.

        Offering units that cannot run would let the policy admit work that then does not happen, and
        teach the co-run model intervals shorter than the work it was told about."""
        upcoming = self.trainer.peek()
        if self.offer_blocked or self.free >= self.roofline.activation_tokens:
            return upcoming
        if not self.trainer.in_flight:
            return []
        return upcoming[: self.trainer.units_left_in_micro_batch()]

    def _run_unit(self, share: float) -> float | None:
        """Run the next unit on ``share`` of the SMs; ``None`` when a new micro-batch finds no pages."""
        work = self.trainer.next_unit()
        if work.kind == "forward" and not self.trainer.in_flight:  # the server's ``lending.prepare``
            need = self.roofline.activation_tokens
            if self.free < need:
                return None
            self.free, self.lent = self.free - need, need
        seconds = self._jitter(self.roofline.unit_s(work, share), self.roofline.assume.unit_jitter)
        tokens = self.trainer.advance()
        if tokens:
            self.free, self.lent = self.free + self.lent, 0
        self.colocation.unit_done(work, seconds, micro_batch_tokens=tokens)
        return seconds

    def _reclaim(self) -> None:
        """Decode needs the lent pages: drop the micro-batch in flight (it will be replayed)."""
        if self.lent:
            self.trainer.drop()
            self.free, self.lent = self.free + self.lent, 0

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, trace: Sequence[Request], duration_s: float) -> dict:
        clock, colocation = self.clock, self.colocation
        queue: deque[Request] = deque()
        batch = _Batch()
        arrivals = iter(trace)
        upcoming_arrival = next(arrivals, None)
        gaps: list[tuple[float, int]] = []  # (token interval, requests that waited for it)
        decode_tokens = finished = 0
        batch_time = lent_time = 0.0
        chained = False  # the last event was a decode step's result
        while clock.now < duration_s:
            while upcoming_arrival is not None and upcoming_arrival.at_s <= clock.now:
                queue.append(upcoming_arrival)
                upcoming_arrival = next(arrivals, None)
            joined = 0
            while queue:
                need = queue[0].prompt + queue[0].output
                if self.free < need <= self.free + self.lent:
                    self._reclaim()
                if need > self.free:
                    break
                self.free -= batch.join(queue.popleft())
                joined += 1
            if not batch.size:
                chained = False
                colocation.idle()
                next_at = duration_s if upcoming_arrival is None else min(upcoming_arrival.at_s, duration_s)
                if not self._idle_slice(next_at):
                    clock.now = max(clock.now, next_at)
                continue
            shape = DecodeShape(batch_size=batch.size, context_tokens=batch.context)
            if chained:
                interval, step_s, solo = self._interval(shape, colocation.admit(shape, self._offer()))
            else:  # the first step after idle closes no interval; nothing is admitted before it
                step_s = self._decode_s(shape)
                interval, solo = step_s, True
            clock.now += interval
            lent_time += self.lent * interval
            batch_time += batch.size * interval
            colocation.decode_done(shape, step_s, solo=solo)
            if chained and batch.size > joined:
                gaps.append((interval, batch.size - joined))
            chained = True
            decode_tokens += batch.size
            ended, released = batch.advance()
            finished += ended
            self.free += released
        return {
            "gaps": gaps,
            "decode_tokens": decode_tokens,
            "finished": finished,
            "lent_time": lent_time,
            "batch_time": batch_time,
        }

    def _decode_s(self, shape: DecodeShape, finetune_share: float = 0.0) -> float:
        seconds = self.roofline.decode_s(shape.batch_size, shape.context_tokens, finetune_share)
        return self._jitter(seconds, self.roofline.assume.decode_jitter)

    def _interval(self, shape: DecodeShape, admission) -> tuple[float, float, bool]:
        """Run the admitted units and the step: (token interval, decode step time, step ran alone)."""
        share = self.splits[admission.split]
        work_s, ran = 0.0, 0
        for _ in range(admission.units):
            seconds = self._run_unit(share)
            if seconds is None:
                break  # no pages to lend for a new micro-batch: decode keeps them
            work_s, ran = work_s + seconds, ran + 1
        self.split_units[admission.split] += ran
        if ran and admission.split != SHARED:  # concurrent, fenced: both must finish
            step = self._decode_s(shape, share)
            return max(step, work_s), step, False
        step = self._decode_s(shape)  # time-sharing: the units, then the step on the whole GPU
        return work_s + step, step, True

    def _idle_slice(self, next_arrival_s: float) -> bool:
        """No request running: train on the whole GPU for one slice, yielding when a request arrives."""
        admission = self.colocation.admit(None, self.trainer.peek())
        deadline = self.clock.now + (admission.budget_s or 0.0)
        ran = False
        while self.clock.now < deadline and self.clock.now < next_arrival_s:
            seconds = self._run_unit(1.0)
            if seconds is None:
                return ran
            self.clock.now += seconds
            ran = True
        return ran


def simulate(
    roofline: Roofline,
    policy: str,
    trace: Sequence[Request],
    *,
    duration_s: float,
    slo_s: float,
    load: float,
    static_units: int = 0,
    seed: int = 0,
    partitions: bool = True,
    offer_blocked: bool = True,
) -> RunResult:
    instance = Instance(
        roofline,
        policy,
        slo_s=slo_s,
        static_units=static_units,
        seed=seed,
        partitions=partitions,
        offer_blocked=offer_blocked,
    )
    out = instance.run(trace, duration_s)
    intervals = np.array([g for g, _ in out["gaps"]] or [math.nan])
    weights = np.array([w for _, w in out["gaps"]] or [1])
    p50, p99 = _weighted_percentiles(intervals * 1e3, weights, (0.50, 0.99))
    attainment = float(weights[intervals <= slo_s].sum() / weights.sum()) if out["gaps"] else math.nan
    stats = instance.colocation.snapshot()
    corun = [s.mape_overall for s in stats.predictor.corun.values() if s.mape_overall is not None]
    return RunResult(
        policy=policy,
        load=load,
        static_units=static_units if policy == "static" else None,
        finetune_tokens_per_s=instance.trainer.trained_tokens / duration_s,
        slo_attainment=attainment,
        tpot_p50_ms=p50,
        tpot_p99_ms=p99,
        decode_tokens_per_s=out["decode_tokens"] / duration_s,
        mean_batch=out["batch_time"] / duration_s,
        requests=len(trace),
        finished=out["finished"],
        micro_batches_dropped=instance.trainer.dropped,
        lent_gb_mean=out["lent_time"] / duration_s * roofline.model.kv_bytes_per_token / 1e9,
        split_units=instance.split_units,
        margin_ms=stats.policy.margin_ms,
        predictor_solo_mape=stats.predictor.solo.mape_overall,
        predictor_corun_mape=statistics.fmean(corun) if corun else None,
    )


def _weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    order = np.argsort(values)
    values, cumulative = values[order], np.cumsum(weights[order])
    return [float(values[min(np.searchsorted(cumulative, q * cumulative[-1]), len(values) - 1)]) for q in qs]


# -- experiments ---------------------------------------------------------------------------------------


class Settings(msgspec.Struct, kw_only=True):
    loads: list[float] = msgspec.field(default_factory=lambda: [0.2, 0.5, 0.8, 0.95])
    duration_s: float = 90.0
    """Simulated seconds per run."""
    seeds: list[int] = msgspec.field(default_factory=lambda: [0])
    slo_ms: float = 50.0
    max_static_units: int = 2 * 32 + 1
    """Upper end of the static search: one micro-batch's units."""
    offer_blocked: bool = True
    """Offer the policy units that cannot start for want of lendable pages, as ``srt`` does."""


class LoadResult(msgspec.Struct, kw_only=True):
    load: float
    seed: int
    arrival_rate: float
    runs: list[RunResult]
    best_baseline: str | None
    """The baseline with the most finetune throughput among those holding the SLO."""
    gain: float | None
    """harli / best baseline - 1, where harli holds the SLO too."""
    note: str = ""


class Report(msgspec.Struct, kw_only=True):
    label: str
    settings: Settings
    model: ModelShape
    gpu: Gpu
    assumptions: Assumptions
    workload: Workload
    finetune: FinetuneSetup
    kv_pool_tokens: int
    solo_step_ms: dict[str, float]
    """Roofline decode step at a few batch sizes (1k-token contexts), for orientation."""
    finetune_alone_tokens_per_s: float
    saturation_rate: float
    """Arrivals/s at load 1.0."""
    loads: list[LoadResult]
    average_gain: float | None
    max_gain: float | None
    seconds: float


def best_static(roofline: Roofline, trace, *, settings: Settings, load: float, seed: int) -> RunResult:
    """The largest units-per-step that holds the SLO on this trace (attainment falls as units grow)."""
    runs: dict[int, RunResult] = {}

    def run(units: int) -> RunResult:
        if units not in runs:
            runs[units] = simulate(
                roofline, "static", trace, duration_s=settings.duration_s, slo_s=settings.slo_ms / 1e3,
                load=load, static_units=units, seed=seed,
            )  # fmt: skip
        return runs[units]

    low, high = 0, settings.max_static_units
    while low < high:
        middle = (low + high + 1) // 2
        if run(middle).slo_attainment >= ATTAINMENT_TARGET:
            low = middle
        else:
            high = middle - 1
    return run(low)


def evaluate_load(
    roofline: Roofline, workload: Workload, settings: Settings, *, load, seed, rate
) -> LoadResult:
    """Every policy on one seeded trace; ``harli/shared`` (no SM partitions) shows what the splits add."""
    trace = workload.trace(seed, settings.duration_s, load * rate)
    common = {"duration_s": settings.duration_s, "slo_s": settings.slo_ms / 1e3, "load": load, "seed": seed}
    offer = {"offer_blocked": settings.offer_blocked}
    runs = [
        simulate(roofline, "harli", trace, **common, **offer),
        msgspec.structs.replace(
            simulate(roofline, "harli", trace, partitions=False, **common, **offer), policy="harli/shared"
        ),
        simulate(roofline, "idle-only", trace, **common),
        simulate(roofline, "naive", trace, **common),
        best_static(roofline, trace, settings=settings, load=load, seed=seed),
    ]
    return gain_at(load, seed, load * rate, runs)


def gain_at(load: float, seed: int, rate: float, runs: list[RunResult]) -> LoadResult:
    harli = next(r for r in runs if r.policy == "harli")
    holding = [r for r in runs if r.policy in BASELINES and r.slo_attainment >= ATTAINMENT_TARGET]
    best = max(holding, key=lambda r: r.finetune_tokens_per_s, default=None)
    gain, note = None, ""
    if not harli.slo_attainment >= ATTAINMENT_TARGET:
        note = f"harli misses the SLO ({harli.slo_attainment:.4f})"
    elif best is None:
        note = "no baseline holds the SLO"
    elif best.finetune_tokens_per_s <= 0:
        note = f"the best baseline ({best.policy}) trains nothing"
    else:
        gain = harli.finetune_tokens_per_s / best.finetune_tokens_per_s - 1
    return LoadResult(
        load=load,
        seed=seed,
        arrival_rate=rate,
        runs=runs,
        best_baseline=best.policy if best else None,
        gain=gain,
        note=note,
    )


def run(settings: Settings, log: Callable[[str], None] = print) -> Report:
    started = time.perf_counter()
    model, gpu, assume, finetune, workload = ModelShape(), Gpu(), Assumptions(), FinetuneSetup(), Workload()
    roofline = Roofline(model, gpu, assume, finetune)
    rate = roofline.saturation_rate(workload, settings.slo_ms / 1e3)
    plan = SimTrainer(model, finetune, peek=1).plan
    alone = finetune.tokens * finetune.accumulation / sum(roofline.unit_s(work) for work in plan)
    log(
        f"SIMULATED {gpu.name}, LLaMA3-8B shape: KV pool {roofline.kv_pool_tokens} tokens, finetune alone "
        f"{alone:.0f} tokens/s, load 1.0 = {rate:.1f} requests/s, SLO {settings.slo_ms:g} ms"
    )
    results = []
    for seed in settings.seeds:
        for load in sorted(settings.loads):
            result = evaluate_load(roofline, workload, settings, load=load, seed=seed, rate=rate)
            results.append(result)
            log(describe_load(result))
    gains = [r.gain for r in results if r.gain is not None]
    return Report(
        label="SIMULATED",
        settings=settings,
        model=model,
        gpu=gpu,
        assumptions=assume,
        workload=workload,
        finetune=finetune,
        kv_pool_tokens=roofline.kv_pool_tokens,
        solo_step_ms={str(b): roofline.decode_s(b, 1024 * b) * 1e3 for b in (1, 16, 64, 256)},
        finetune_alone_tokens_per_s=alone,
        saturation_rate=rate,
        loads=results,
        average_gain=statistics.fmean(gains) if gains else None,
        max_gain=max(gains) if gains else None,
        seconds=time.perf_counter() - started,
    )


def gains_by_load(report: Report) -> dict[float, list[float]]:
    """Every seed's gain, per load level (loads where no gain is defined are left out)."""
    by_load: dict[float, list[float]] = {}
    for result in report.loads:
        if result.gain is not None:
            by_load.setdefault(result.load, []).append(result.gain)
    return dict(sorted(by_load.items()))


def describe_load(result: LoadResult) -> str:
    parts = [
        f"{r.policy}{'' if r.static_units is None else f'({r.static_units})'} "
        f"{r.finetune_tokens_per_s:.0f} tok/s att {r.slo_attainment:.4f}"
        for r in result.runs
    ]
    gain = f"gain {result.gain:+.1%} over {result.best_baseline}" if result.gain is not None else result.note
    rate = f"{result.arrival_rate:.1f} req/s"
    return f"load {result.load:g} (seed {result.seed}, {rate}): " + "; ".join(parts) + f" -> {gain}"


QUICK = Settings(loads=[0.2, 0.5, 0.8, 0.95], duration_s=90.0, seeds=[0, 1])
FULL = Settings(loads=[0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95], duration_s=300.0, seeds=[0, 1, 2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer loads and seeds, shorter traces")
    parser.add_argument("--loads", type=float, nargs="+", help="fractions of the saturation arrival rate")
    parser.add_argument("--duration", type=float, help="simulated seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--slo-ms", type=float)
    parser.add_argument(
        "--runnable-only", action="store_true", help="offer only units that can start (srt offers all)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    overrides = {
        "loads": args.loads,
        "duration_s": args.duration,
        "seeds": args.seeds,
        "slo_ms": args.slo_ms,
        "offer_blocked": False if args.runnable_only else None,
    }
    settings = msgspec.structs.replace(
        QUICK if args.quick else FULL, **{k: v for k, v in overrides.items() if v is not None}
    )
    report = run(settings)
    average = "n/a" if report.average_gain is None else f"{report.average_gain:+.1%}"
    best = "n/a" if report.max_gain is None else f"{report.max_gain:+.1%}"
    print(
        f"SIMULATED harli gain over the best SLO-holding baseline: average {average}, max {best} "
        f"(paper, measured on GPUs: +{PAPER_AVERAGE_GAIN:.1%} average, up to +{PAPER_MAX_GAIN:.1%}); "
        f"{report.seconds:.1f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
