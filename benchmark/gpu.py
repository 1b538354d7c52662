"""``python -m benchmark.gpu``: GPU co-location and trainer MFU, one command for one lent H200.

Parts, each on its own (a part that fails is recorded as failed with its error, and the others still run
and report); every figure goes to ``<out>/gpu.json`` after each part, the log to ``<out>/gpu.log``, and a
table is printed at the end:

- ``ceilings``: the device's measured bf16 matmul peak (large square products, random data, CUDA events
  after warm-up) and HBM bandwidth (a large device-to-device copy, bytes read plus bytes written).
- ``trainer``: ``core.trainer.LoraTrainer`` over a randomly initialised bf16 model of the LLaMA3-8B shape
  (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128256; built from a
  transformers ``LlamaConfig``), LoRA r=16 on all seven projections, sequences of 1,024-2,048 tokens,
  beside the plain transformers + PEFT loop of ``benchmark.train_throughput`` on the same weights and
  examples: tokens/s and MFU against the measured peak (FLOPs counted in ``training_flops``).
- ``decode``: a decode stand-in of the same model (``Decoder``: the model's own weights, a static KV
  cache, one CUDA graph per batch and context, as SGLang captures one per batch size; eager where capture
  fails, and the table says so): step latency by batch and context.
- ``corun``: for every split of the partition menu (``core.partition.make_partitioner``, ``shared``
  included), the decode step alone and with trainer units running in the split
  (``Partitioner.finetune``): latency inflation, finetune tokens/s, and the MAPE of
  ``core.predictor.LatencyPredictor`` fed with those observations, solo and co-run per split.
- ``replay``: a bursty trace (60 s, 30 s with ``--quick``) replayed on the stand-in for each policy
  (``harli``, ``idle-only``, ``naive``, ``static`` tuned once for the trace's peak, and where the menu has
  SM partitions ``fixed-split``, MPS-style, tuned likewise) through the real
  ``core.colocation.CoLocation`` (``admit``, ``unit_done``, ``decode_done``, ``idle``, as the server
  calls them): SLO attainment, TPOT p50/p99 and finetune tokens/s, and harli's gain over the best
  baseline that holds the SLO.

Without CUDA, or with ``--smoke``, the same code runs at a tiny shape (2 layers, hidden 64, vocabulary
512, short sequences, a few steps, the ``shared`` split only, host clocks for timing) in well under a
minute on two cores: ``test/test_gpu_benchmark.py`` runs it so this file cannot rot.

This module imports no SGLang, and nothing but torch at import time: ``ceilings`` runs on a bare torch,
and the other parts import ``sglang_harli.core`` (which needs msgspec) when they start. The GPU machine
has torch, transformers, peft, accelerate and triton but no msgspec and no network, so msgspec travels
as a wheel. Once, here, in the repository root (pip needs the network)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl msgspec==0.23.0

Then, on a lent H200, through the device tool's ``run`` (estimated at about 7.5 minutes of device time;
``--quick`` 4.5), with ``carry: [".whl"]`` and ``timeout_s: 570``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/python || exit; set -o pipefail;
    PYTHONUNBUFFERED=1 python3 -m benchmark.run --only gpu --out $OUT --no-results-md 2>&1 | tee $OUT/run.log

(one line). Back here, ``python -m benchmark.run --merge /work/.device/.../run.json`` records the part in
``benchmark/results/run.json`` and ``RESULTS.md`` (``benchmark/README.md``, "GPU benchmark").

    python -m benchmark.gpu                  # full, on CUDA
    python -m benchmark.gpu --quick          # fewer cells, 30 s replays
    python -m benchmark.gpu --smoke          # the tiny CPU shape (automatic without CUDA)
    python -m benchmark.gpu --only ceilings,decode --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmark" / "results" / "gpu"
PARTS = ("ceilings", "trainer", "decode", "corun", "replay")
POLICIES = ("harli", "idle-only", "naive", "static")
SPATIAL = "fixed-split"
"""The MPS-style baseline (one SM split, fixed units, tuned once for the peak): replayed too where the
menu has partitions, and counted among the realistic baselines."""
GIB = 2**30


# -- settings ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = ModelShape(
    "llama3-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256
)
TINY = ModelShape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    """``full`` or ``quick`` on CUDA; ``smoke`` at the tiny shape (any device)."""
    model: ModelShape
    dtype: str
    seed: int = 0
    # ceilings
    matmul_n: int = 8192
    copy_mib: int = 2048
    """Size of the copied buffer; the bandwidth counts it twice (read and written)."""
    timed_reps: int = 30
    # trainer
    seq_min: int = 1024
    seq_max: int = 2048
    train_examples: int = 24
    micro_batch: int = 1
    """One sequence per micro-batch: packed rows of several sequences make SDPA compute the whole
    block-diagonal score matrix (RESULTS.md, issue 3), which is not what this part measures."""
    accumulation: int = 4
    train_repeats: int = 2
    lora_r: int = 16
    # co-location (corun and replay)
    layers_per_unit: int = 1
    """The server's default granularity (``--harli-layers-per-unit``)."""
    # decode
    decode_batches: tuple[int, ...] = (1, 16, 64, 256)
    decode_contexts: tuple[int, ...] = (512, 4096)
    decode_steps: int = 40
    # corun
    corun_shapes: tuple[tuple[int, int], ...] = ((16, 2048), (64, 2048))
    """(batch, context per request) of the decode step."""
    corun_units: tuple[int, ...] = (4, 16)
    """Finetune units run beside each decode step."""
    corun_intervals: int = 30
    all_splits: bool = True
    # replay
    replay_s: float = 60.0
    replay_max_batch: int = 64
    replay_contexts: tuple[int, ...] = (512, 1024, 1536, 2048)
    """Context buckets: a step attends every request over the bucket of the batch's mean context."""
    prompt_tokens: tuple[int, int] = (256, 1280)
    output_tokens: tuple[int, int] = (64, 512)
    period_s: float = 12.0
    burst_fill: float = 0.8
    """Arrival rate in a burst: enough requests to keep this share of the maximum batch running."""
    quiet_share: float = 0.125
    """Arrival rate between bursts, as a share of the burst's."""
    slo_factor: float = 2.0
    """Without ``--slo-ms``: the TPOT SLO is this multiple of the solo token interval at the peak batch."""
    slo_ms: float | None = None
    calibration_steps: int = 20


def make_settings(mode: str, seed: int = 0, **overrides: Any) -> Settings:
    if mode == "full":
        settings = Settings(mode=mode, model=LLAMA3_8B, dtype="bfloat16", seed=seed)
    elif mode == "quick":
        settings = Settings(
            mode=mode,
            model=LLAMA3_8B,
            dtype="bfloat16",
            seed=seed,
            timed_reps=20,
            train_examples=16,
            train_repeats=1,
            decode_batches=(1, 64, 256),
            decode_steps=30,
            corun_shapes=((64, 2048),),
            corun_units=(8,),
            corun_intervals=20,
            replay_s=30.0,
        )
    elif mode == "smoke":
        settings = Settings(
            mode=mode,
            model=TINY,
            dtype="float32",
            seed=seed,
            matmul_n=256,
            copy_mib=16,
            timed_reps=5,
            seq_min=24,
            seq_max=48,
            train_examples=8,
            accumulation=2,
            train_repeats=1,
            decode_batches=(1, 8, 64),
            decode_contexts=(64, 256),
            decode_steps=15,
            corun_shapes=((8, 64),),
            corun_units=(2,),
            corun_intervals=8,
            all_splits=False,
            replay_s=2.5,
            replay_max_batch=16,
            replay_contexts=(64, 128),
            prompt_tokens=(16, 64),
            output_tokens=(8, 48),
            period_s=2.5,
            # units of the tiny trainer cost several tiny decode steps on a CPU: a looser SLO lets harli
            # and static run units beside decode, so the smoke covers that path too
            slo_factor=8.0,
            calibration_steps=8,
        )
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


# -- the run: device, log, results ------------------------------------------------------------------------


class Run:
    """What the parts share: the device, the log, the results so far, and the base weights (built once)."""

    def __init__(self, settings: Settings, device: torch.device, out: Path, command: str):
        self.settings, self.device, self.out = settings, device, out
        self.cuda = device.type == "cuda"
        self.dtype = getattr(torch, settings.dtype)
        out.mkdir(parents=True, exist_ok=True)
        self._log = (out / "gpu.log").open("a")
        self.result: dict[str, Any] = {
            "mode": settings.mode,
            "command": command,
            "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": describe_device(device),
            "settings": dataclasses.asdict(settings),
            "parts": {},
        }
        self._base: Base | None = None
        self._partitioner = None
        self.decode_stream = torch.cuda.Stream(device) if self.cuda else None

    def log(self, line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        self._log.write(stamped + "\n")
        self._log.flush()

    def save(self) -> Path:
        path = self.out / "gpu.json"
        path.write_text(json.dumps(self.result, indent=1, default=_json_default) + "\n")
        return path

    def base(self) -> Base:
        if self._base is None:
            started = time.perf_counter()
            self._base = Base(self.settings.model, self.device, self.dtype, self.settings.seed)
            self.log(
                f"base weights: {self.settings.model.name}, {self._base.params / 1e9:.2f}B params "
                f"{self.settings.dtype} on {self.device} ({time.perf_counter() - started:.1f} s)"
            )
        return self._base

    def partitioner(self):
        """The server's menu (``make_partitioner``); the smoke keeps only ``shared``."""
        if self._partitioner is None:
            from sglang_harli.core.partition import make_partitioner

            self._partitioner = make_partitioner(self.device)
            self._partitioner.prepare()
            self.log(f"partitions: {self._partitioner.describe()}")
        return self._partitioner

    def menu(self):
        splits = self.partitioner().splits
        return splits if self.settings.all_splits else splits[:1]

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_calls(self, fn: Callable[[], Any], reps: int, warmup: int = 3) -> list[float]:
        """Seconds of each of ``reps`` calls after ``warmup``: CUDA events on the current stream (one
        wait at the end), the host clock on a CPU."""
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return times
        pairs = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        self.sync()
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]

    def peak_flops(self) -> float | None:
        ceilings = self.result["parts"].get("ceilings", {})
        tflops = ceilings.get("matmul_tflops") if ceilings.get("status") == "ok" else None
        return None if tflops is None else tflops * 1e12

    def bandwidth(self) -> float | None:
        ceilings = self.result["parts"].get("ceilings", {})
        gbps = ceilings.get("copy_gbps") if ceilings.get("status") == "ok" else None
        return None if gbps is None else gbps * 1e9


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
    }
    for package in ("transformers", "peft", "accelerate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / GIB,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    else:
        info["name"] = "CPU"
    return info


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "__struct_fields__"):  # a msgspec struct from core
        return {f: getattr(value, f) for f in value.__struct_fields__}
    return str(value)


# -- base weights, shared by every model of the run -------------------------------------------------------


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


class Base:
    """Random weights of ``shape`` on the device, held once: the trainer, the PEFT loop and the decode
    stand-in all alias them (``core.base_model.build_bound_model``), as the server's trainer aliases the
    engine's weights. Normal(0, 0.02) everywhere but the norms (ones), drawn on the device."""

    def __init__(self, shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.shape, self.device, self.dtype = shape, device, dtype
        self.config = llama_config(shape)
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(self.config)
        generator = torch.Generator(device=device).manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, param in meta.named_parameters():
            tensor = torch.empty(param.shape, dtype=dtype, device=device)
            if "norm" in name:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            self.tensors[name] = tensor
        del meta
        self.params = sum(t.numel() for t in self.tensors.values())

    def bound_model(self) -> torch.nn.Module:
        from sglang_harli.core.base_model import build_bound_model

        return build_bound_model(self.config, self.tensors).to(self.device)  # moves the rotary buffers


def make_examples(settings: Settings, count: int, seed: int) -> list:
    """Lengths uniform in [seq_min, seq_max]; the second half of each sequence is its target."""
    from sglang_harli.core.data import Example

    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n = rng.randint(settings.seq_min, settings.seq_max)
        ids = [rng.randrange(8, settings.model.vocab) for _ in range(n)]
        examples.append(Example(input_ids=ids, loss_mask=[i >= n // 2 for i in range(n)]))
    return examples


def lora_spec(settings: Settings):
    from sglang_harli.core.jobs import PEFT_TARGET_MODULES, LoraSpec

    return LoraSpec(r=settings.lora_r, alpha=2.0 * settings.lora_r, target_modules=list(PEFT_TARGET_MODULES))


def training_flops(shape: ModelShape, examples: Sequence, rank: int) -> float:
    """Model FLOPs of one pass over ``examples`` (forward and backward), counting only what the training
    objective needs: the frozen base layers' forward and input gradients (no weight gradients), LoRA's
    forward, input and weight gradients on all seven projections, causal attention (half the score
    matrix; backward twice the forward), and the LM head at target positions only (forward and input
    gradient). Both sides of the comparison are scored against the same count, so work the PEFT loop
    spends on padding or on logits nobody trains on earns it nothing."""
    d, kv, inter = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    linear = 2 * d * d + 2 * d * kv + 3 * d * inter  # q, o; k, v; gate, up, down
    projections = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    lora = rank * sum(i + o for i, o in projections)
    total = 0.0
    for example in examples:
        n, targets = len(example.input_ids), sum(example.loss_mask[1:])
        forward = 2 * linear * n + 2 * lora * n + 2 * n * n * d
        backward = 2 * linear * n + 4 * lora * n + 4 * n * n * d
        total += shape.layers * (forward + backward) + 4 * d * shape.vocab * targets
    return total


# -- the decode stand-in ----------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Decoder:
    """A LLaMA decode step over ``Base``'s weights with a static KV cache: what SGLang's decode forward
    does per step (every layer's projections, attention over each request's cached keys and values, the
    LM head and a greedy sample), without its paging, fused kernels or scheduler.

    The cache is ``[layers, max_batch, max_context, kv_heads, head_dim]`` for keys and for values, filled
    with random numbers (never time on zeros). A step of ``(batch, context)`` writes the new token's keys
    and values at position ``context - 1`` of each request and attends over positions ``[0, context)``;
    grouped-query attention is one SDPA call with each KV head's query heads as its rows. Each
    ``(batch, context)`` gets its own CUDA graph (SGLang captures one per batch size; here the context is
    fixed per graph too, so attention reads a static slice); where capture fails the step runs eagerly and
    ``mode`` says why.
    """

    def __init__(self, base: Base, *, max_batch: int, max_context: int, graphs: bool = True, seed: int = 0):
        shape, tensors = base.shape, base.tensors
        self.shape, self.device, self.dtype = shape, base.device, base.dtype
        self.eps = float(base.config.rms_norm_eps)
        self.max_batch, self.max_context = max_batch, max_context
        self.layers = []
        for i in range(shape.layers):
            p = f"model.layers.{i}."
            self.layers.append(
                tuple(
                    tensors[p + name + ".weight"]
                    for name in (
                        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                        "mlp.down_proj",
                    )
                )
            )  # fmt: skip
        self.embed = tensors["model.embed_tokens.weight"]
        self.norm = tensors["model.norm.weight"]
        self.head = tensors["lm_head.weight"]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = (shape.layers, max_batch, max_context, shape.kv_heads, shape.head_dim)
        self.keys = torch.empty(cache, dtype=self.dtype, device=self.device).normal_(generator=generator)
        self.values = torch.empty(cache, dtype=self.dtype, device=self.device).normal_(generator=generator)
        self.ids = torch.randint(8, shape.vocab, (max_batch,), device=self.device, generator=generator)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self._rotary = LlamaRotaryEmbedding(config=base.config).to(self.device)
        self.cuda = self.device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.capture_failure: str | None = None
        self._runners: dict[tuple[int, int], Callable[[], Any]] = {}
        self._keep: list[Any] = []
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @property
    def mode(self) -> str:
        if not self.cuda:
            return f"eager ({self.device.type})"
        if not self.graphs:
            return "eager (graphs off)"
        if self.capture_failure:
            return f"eager (CUDA graph capture failed: {self.capture_failure})"
        return "CUDA graph per (batch, context)"

    def rope(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        positions = torch.tensor([[position]], device=self.device)
        cos, sin = self._rotary(probe, positions)
        return cos.reshape(-1), sin.reshape(-1)

    @torch.no_grad()
    def forward(self, batch: int, context: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One step for requests ``[0, batch)`` at ``context`` tokens each; returns the logits."""
        shape = self.shape
        heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
        position = context - 1
        x = F.embedding(self.ids[:batch], self.embed)
        for layer, (w_in, wq, wk, wv, wo, w_post, w_gate, w_up, w_down) in enumerate(self.layers):
            h = _rms(x, w_in, self.eps)
            q = _rotate(F.linear(h, wq).view(batch, heads, head_dim), cos, sin)
            k = _rotate(F.linear(h, wk).view(batch, kv_heads, head_dim), cos, sin)
            self.keys[layer, :batch, position].copy_(k)
            self.values[layer, :batch, position].copy_(F.linear(h, wv).view(batch, kv_heads, head_dim))
            keys = self.keys[layer, :batch, :context].transpose(1, 2)  # [batch, kv_heads, context, dim]
            values = self.values[layer, :batch, :context].transpose(1, 2)
            rows = q.view(batch, kv_heads, heads // kv_heads, head_dim)
            attention = F.scaled_dot_product_attention(rows, keys, values)
            x = x + F.linear(attention.reshape(batch, heads * head_dim), wo)
            h = _rms(x, w_post, self.eps)
            x = x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
        logits = F.linear(_rms(x, self.norm, self.eps), self.head)
        self.ids[:batch].copy_(logits.argmax(-1))
        return logits

    def runner(self, batch: int, context: int) -> Callable[[], Any]:
        """The step of ``(batch, context)``: a graph replay where capture works, else the eager forward."""
        if not (0 < batch <= self.max_batch and 0 < context <= self.max_context):
            raise ValueError(
                f"step ({batch}, {context}) outside the cache ({self.max_batch}, {self.max_context})"
            )
        key = (batch, context)
        if key in self._runners:
            return self._runners[key]
        cos, sin = self.rope(context - 1)

        def eager() -> None:
            self.forward(batch, context, cos, sin)

        run: Callable[[], Any] = eager
        if self.graphs and self.capture_failure is None:
            try:
                run = self._capture(eager)
            except Exception as exc:  # eager still measures the step, with launch overhead, and says so
                self.capture_failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device)
        self._runners[key] = run
        self._keep.append((cos, sin))
        return run

    def _capture(self, eager: Callable[[], None]) -> Callable[[], Any]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, SDPA kernels
            eager()
            eager()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            eager()
        self._keep.append(graph)
        return graph.replay

    def bytes_per_step(self, batch: int, context: int) -> int:
        """What a step must read at least: every weight but the embedding table (a row per request),
        and each request's keys and values over its context."""
        element = self.embed.element_size()
        weights = (
            sum(t.numel() for layer in self.layers for t in layer) + self.norm.numel() + self.head.numel()
        )
        kv = batch * context * self.shape.layers * 2 * self.shape.kv_heads * self.shape.head_dim
        return (weights + kv + batch * self.shape.hidden) * element


# -- finetune units beside decode steps: the same interval for corun and replay ---------------------------


def _stopwatch(device: torch.device):
    """``core.timing``'s stopwatch (CUDA events, the host clock on a CPU): what the server times with."""
    from sglang_harli.core.timing import stopwatch

    return stopwatch(device)


def colocated_trainer(run: Run):
    """The trainer a co-located job runs: layer-wise units (the server's granularity) over the base
    weights, enough epochs never to finish within the run."""
    from sglang_harli.core.jobs import TrainingSpec
    from sglang_harli.core.trainer import LoraTrainer

    s = run.settings
    examples = make_examples(s, count=max(8, s.train_examples), seed=s.seed + 1)
    training = TrainingSpec(
        epochs=1000,
        micro_batch_size=s.micro_batch,
        gradient_accumulation_steps=s.accumulation,
        max_seq_len=s.seq_max,
        seed=s.seed,
        learning_rate=1e-4,
        lr_scheduler="constant",
    )
    return LoraTrainer(
        run.base().bound_model(), examples, lora_spec(s), training, layers_per_unit=s.layers_per_unit
    )


@dataclasses.dataclass
class Interval:
    seconds: float
    """Wall clock from before the first launch to the end of the step and the units: what a client sees."""
    step_s: float
    """The decode step alone, on the device (CUDA events on the decode stream; the host clock on a CPU)."""
    units: list[tuple[Any, float, int]]
    """(work, device seconds, tokens of the micro-batch it completed) per unit that ran."""


class Colocated:
    """Runs one token interval: finetune units in a split and one decode step, as the server places them.

    In ``shared`` the units run first and the step follows on the whole device (time-sharing, one after
    the other). In a partitioned split the step is launched on the decode stream first and the units go
    into the split's green context (``Partitioner.finetune``) concurrently; the interval ends when both
    have. Unit costs are timed by ``core.timing``'s stopwatch inside the split, as ``srt.unit_runner``
    times them."""

    def __init__(self, run: Run, decoder: Decoder, trainer):
        self.run, self.decoder, self.trainer = run, decoder, trainer
        self.partitioner = run.partitioner()
        self.stopwatch = _stopwatch(run.device)

    def unit(self, split) -> tuple[Any, Any, int]:
        work = self.trainer.peek(1)[0]
        before = self.trainer.tokens_trained
        with self.partitioner.finetune(split):
            started = self.stopwatch.start()
            self.trainer.run_unit()
            timing = self.stopwatch.stop(started)
        return work, timing, self.trainer.tokens_trained - before

    def interval(self, batch: int, context: int, split, units: int) -> Interval:
        step = self.decoder.runner(batch, context)
        started = time.perf_counter()
        ran: list[tuple[Any, Any, int]] = []
        if not self.run.cuda:
            ran = [self.unit(split) for _ in range(units)]
            step_started = time.perf_counter()
            step()
            step_s = time.perf_counter() - step_started
        else:
            stream = self.run.decode_stream
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if split.partitioned and units:
                with torch.cuda.stream(stream):
                    begin.record()
                    step()
                    end.record()
                ran = [self.unit(split) for _ in range(units)]
            else:
                ran = [self.unit(split) for _ in range(units)]
                stream.wait_stream(torch.cuda.current_stream(self.run.device))
                with torch.cuda.stream(stream):
                    begin.record()
                    step()
                    end.record()
            torch.cuda.synchronize(self.run.device)
            step_s = begin.elapsed_time(end) / 1e3
        seconds = time.perf_counter() - started
        units_out = [(work, timing.seconds() or 0.0, tokens) for work, timing, tokens in ran]
        return Interval(seconds=seconds, step_s=step_s, units=units_out)

    def idle_unit(self, split) -> tuple[Any, float, int]:
        work, timing, tokens = self.unit(split)
        self.run.sync()
        return work, timing.seconds() or 0.0, tokens


# -- parts ------------------------------------------------------------------------------------------------


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


def part_trainer(run: Run) -> dict[str, Any]:
    from benchmark.train_throughput import WARMUP_STEPS, run_ours, train_reference
    from sglang_harli.core.jobs import TrainingSpec
    from sglang_harli.core.trainer import plan_steps

    s = run.settings
    base = run.base()
    examples = make_examples(s, s.train_examples, seed=s.seed)
    lora = lora_spec(s)
    training = TrainingSpec(
        epochs=1,
        micro_batch_size=s.micro_batch,
        gradient_accumulation_steps=s.accumulation,
        max_seq_len=s.seq_max,
        seed=s.seed,
        learning_rate=2e-4,
        lr_scheduler="linear",
    )
    steps = plan_steps(len(examples), training)
    if steps <= WARMUP_STEPS:
        raise ValueError(
            f"{len(examples)} examples make {steps} optimizer steps; need more than {WARMUP_STEPS}"
        )
    tokens = sum(len(e.input_ids) for e in examples)
    flops_per_token = training_flops(s.model, examples, lora.r) / tokens
    peak = run.peak_flops()
    run.log(
        f"trainer: {len(examples)} examples ({tokens} tokens, {s.seq_min}-{s.seq_max}), micro-batch "
        f"{s.micro_batch} x {s.accumulation} accumulated, {steps} steps ({WARMUP_STEPS} untimed), LoRA "
        f"r={lora.r} on {','.join(lora.target_modules)}; {flops_per_token / 1e9:.1f} GFLOP/token"
    )
    sides: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": []}
    for repeat in range(s.train_repeats):
        order = ("ours", "reference") if repeat % 2 == 0 else ("reference", "ours")
        for side in order:
            run.free()
            if run.cuda:
                torch.cuda.reset_peak_memory_stats(run.device)
            if side == "ours":
                timing = run_ours(base.config, base.tensors, examples, lora, training)
            else:
                timing = train_reference(base.bound_model(), run.device, examples, lora, training)
            rate = timing.tokens / timing.seconds
            mfu = rate * flops_per_token / peak if peak else None
            entry = {
                "repeat": repeat,
                "tokens": timing.tokens,
                "seconds": timing.seconds,
                "tokens_per_s": rate,
                "final_loss": timing.final_loss,
                "mfu": mfu,
                "peak_memory_gib": torch.cuda.max_memory_allocated(run.device) / GIB if run.cuda else None,
            }
            sides[side].append(entry)
            run.log(
                f"  repeat {repeat} {side}: {rate:.0f} tokens/s, loss {timing.final_loss:.4f}"
                + (f", MFU {mfu:.1%}" if mfu is not None else "")
            )
    run.free()
    ours = statistics.median(e["tokens_per_s"] for e in sides["ours"])
    reference = statistics.median(e["tokens_per_s"] for e in sides["reference"])
    return {
        "model": s.model.name,
        "examples": len(examples),
        "tokens": tokens,
        "sequence": [s.seq_min, s.seq_max],
        "micro_batch": s.micro_batch,
        "accumulation": s.accumulation,
        "lora_r": lora.r,
        "target_modules": list(lora.target_modules),
        "flops_per_token": flops_per_token,
        "peak_tflops": None if peak is None else peak / 1e12,
        "ours": sides["ours"],
        "reference": sides["reference"],
        "ours_tokens_per_s": ours,
        "reference_tokens_per_s": reference,
        "ratio": ours / reference,
        "mfu": ours * flops_per_token / peak if peak else None,
        "reference_mfu": reference * flops_per_token / peak if peak else None,
        "final_loss": sides["ours"][-1]["final_loss"],
    }


def part_decode(run: Run) -> dict[str, Any]:
    s = run.settings
    base = run.base()
    bandwidth = run.bandwidth()
    rows, modes = [], set()
    element = base.tensors["lm_head.weight"].element_size()
    kv_per_token = s.model.layers * 2 * s.model.kv_heads * s.model.head_dim * element
    for context in s.decode_contexts:
        for batch in s.decode_batches:
            row: dict[str, Any] = {"batch": batch, "context": context}
            need = batch * context * kv_per_token
            if run.cuda:
                free, _ = torch.cuda.mem_get_info(run.device)
                if need > free - 8 * GIB:
                    row["skipped"] = f"KV cache needs {need / GIB:.0f} GiB, {free / GIB:.0f} GiB free"
                    rows.append(row)
                    run.log(f"decode batch {batch} context {context}: skipped ({row['skipped']})")
                    continue
            decoder = Decoder(base, max_batch=batch, max_context=context, seed=s.seed)
            stream = run.decode_stream
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                step = decoder.runner(batch, context)
                times = run.time_calls(step, s.decode_steps, warmup=3)
            modes.add(decoder.mode)
            step_s = statistics.median(times)
            moved = decoder.bytes_per_step(batch, context)
            row.update(
                mode=decoder.mode,
                step_ms=step_s * 1e3,
                p90_ms=sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
                bytes=moved,
                achieved_gbps=moved / step_s / 1e9,
                bandwidth_share=moved / step_s / bandwidth if bandwidth else None,
            )
            rows.append(row)
            run.log(f"decode batch {batch} context {context}: {step_s * 1e3:.3f} ms ({decoder.mode})")
            del decoder, step
            run.free()
    return {"rows": rows, "modes": sorted(modes)}


def part_corun(run: Run) -> dict[str, Any]:
    from sglang_harli.core.colocation import CoLocation
    from sglang_harli.core.config import HarliConfig
    from sglang_harli.core.predictor import DecodeShape

    s = run.settings
    menu = run.menu()
    decoder = Decoder(
        run.base(),
        max_batch=max(b for b, _ in s.corun_shapes),
        max_context=max(c for _, c in s.corun_shapes),
        seed=s.seed,
    )
    trainer = colocated_trainer(run)
    colocated = Colocated(run, decoder, trainer)
    # the predictor the server runs, told the menu as the server tells it
    predictor = CoLocation.from_config(HarliConfig(), splits={x.name: x.share for x in menu}).predictor
    shared = menu[0]
    per_unit_tokens = _mean_micro_batch_tokens(trainer) / trainer.units_per_micro_batch
    # warm-up and start-up profile, as the server's: one micro-batch on the whole device
    for _ in range(trainer.units_per_micro_batch):
        work, seconds, _ = colocated.idle_unit(shared)
        predictor.observe_unit(work, seconds, shared.name)
    solo: dict[tuple[int, int], list[float]] = {}
    solo_intervals: dict[tuple[int, int], list[float]] = {}
    for batch, context in s.corun_shapes:
        shape = DecodeShape(batch_size=batch, context_tokens=batch * context)
        colocated.interval(batch, context, shared, 0)
        for _ in range(s.corun_intervals):
            result = colocated.interval(batch, context, shared, 0)
            predictor.observe_solo(shape, result.step_s)
            solo.setdefault((batch, context), []).append(result.step_s)
            solo_intervals.setdefault((batch, context), []).append(result.seconds)
    rows: list[dict[str, Any]] = []
    for (batch, context), times in solo.items():
        rows.append(
            {
                "split": "alone",
                "share": 0.0,
                "batch": batch,
                "context": context,
                "units": 0,
                "decode_ms": statistics.median(times) * 1e3,
                "inflation": 1.0,
                "interval_ms": statistics.median(solo_intervals[(batch, context)]) * 1e3,
                "finetune_tokens_per_s": 0.0,
            }
        )
    failures: dict[str, str] = {}
    for split in menu:
        try:
            rows += _corun_split(run, colocated, predictor, split, solo, per_unit_tokens)
        except Exception as exc:  # one split's failure must not cost the others their rows
            traceback.print_exc()
            failures[split.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            run.log(f"corun split {split.name} failed: {failures[split.name]}")
            run.sync()
    stats = predictor.snapshot()
    result = {
        "splits": [{"name": x.name, "share": x.share, "sms": x.finetune_sms} for x in menu],
        "partitions": run.partitioner().describe(),
        "decode_mode": decoder.mode,
        "rows": rows,
        "failures": failures,
        "predictor": {
            "solo_mape": stats.solo.mape_overall,
            "solo_mape_recent": stats.solo.mape_recent,
            "corun_mape": {name: st.mape_overall for name, st in stats.corun.items()},
            "corun_mape_recent": {name: st.mape_recent for name, st in stats.corun.items()},
            "corun_samples": {name: st.samples for name, st in stats.corun.items()},
        },
    }
    return result


def _mean_micro_batch_tokens(trainer) -> float:
    lengths = [len(e.input_ids) for e in trainer.examples]
    return statistics.fmean(lengths) * trainer.training.micro_batch_size


def _corun_split(run: Run, colocated: Colocated, predictor, split, solo, per_unit_tokens) -> list[dict]:
    from sglang_harli.core.predictor import DecodeShape

    s = run.settings
    rows = []
    for batch, context in s.corun_shapes:
        shape = DecodeShape(batch_size=batch, context_tokens=batch * context)
        for units in s.corun_units:
            first = colocated.interval(batch, context, split, units)  # the split's first use: not a row
            for w, seconds, _ in first.units:
                predictor.observe_unit(w, seconds, split.name)
            steps, intervals, ran = [], [], 0
            started = time.perf_counter()
            for _ in range(s.corun_intervals):
                upcoming = colocated.trainer.peek(units)
                predicted = predictor.corun(shape, upcoming, split.name)
                result = colocated.interval(batch, context, split, units)
                work = [w for w, _, _ in result.units]
                # the prediction the policy would have acted on, then what the interval teaches
                predictor.observe_corun(shape, work, result.seconds, split=split.name, predicted=predicted)
                for w, seconds, _ in result.units:
                    predictor.observe_unit(w, seconds, split.name)
                if not split.partitioned:  # time-sharing: the step ran alone on the whole device
                    predictor.observe_solo(shape, result.step_s)
                steps.append(result.step_s)
                intervals.append(result.seconds)
                ran += len(result.units)
            wall = time.perf_counter() - started
            alone = statistics.median(solo[(batch, context)])
            decode = statistics.median(steps)
            row = {
                "split": split.name,
                "share": split.share,
                "batch": batch,
                "context": context,
                "units": units,
                "decode_ms": decode * 1e3,
                "inflation": decode / alone,
                "interval_ms": statistics.median(intervals) * 1e3,
                "interval_p99_ms": sorted(intervals)[int(0.99 * (len(intervals) - 1))] * 1e3,
                "finetune_tokens_per_s": ran * per_unit_tokens / wall,
            }
            rows.append(row)
            run.log(
                f"corun {split.name} batch {batch} context {context} units {units}: decode "
                f"{decode * 1e3:.3f} ms (x{row['inflation']:.2f}), interval {row['interval_ms']:.3f} ms, "
                f"finetune {row['finetune_tokens_per_s']:.0f} tokens/s"
            )
    return rows


# -- replay -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    at_s: float
    prompt: int
    output: int


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return sorted({b for b in sizes if b < max_batch} | {max_batch})


def _bucket(value: float, buckets: Sequence[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    return buckets[-1]


def _weighted(values: list[float], weights: list[int], q: float) -> float | None:
    if not values:
        return None
    order = sorted(range(len(values)), key=values.__getitem__)
    total, seen = sum(weights), 0
    for i in order:
        seen += weights[i]
        if seen >= q * total:
            return values[i]
    return values[order[-1]]


def part_replay(run: Run) -> dict[str, Any]:
    from benchmark.load import bursty_trace
    from benchmark.verdicts import BASELINES, gain_over_best_baseline

    s = run.settings
    menu = run.menu()
    shared = menu[0]
    decoder = Decoder(
        run.base(), max_batch=s.replay_max_batch, max_context=max(s.replay_contexts), seed=s.seed
    )
    trainer = colocated_trainer(run)
    colocated = Colocated(run, decoder, trainer)
    buckets = batch_buckets(s.replay_max_batch)
    started = time.perf_counter()
    for batch in buckets:  # every graph captured before any clock runs
        for context in s.replay_contexts:
            decoder.runner(batch, context)
    run.log(
        f"replay: {len(buckets) * len(s.replay_contexts)} steps ready ({time.perf_counter() - started:.1f} s)"
    )
    # Calibration, on the stand-in itself: the unit cost on the whole device, and the solo interval at the
    # peak batch and at half of it (mean context), from which the SLO, the arrival rates and static's
    # units are derived, so the same trace is as hard for a CPU smoke as for an H200.
    unit_costs = [colocated.idle_unit(shared)[1] for _ in range(trainer.units_per_micro_batch)]
    unit_s = statistics.median(unit_costs)
    mid_context = _bucket(
        statistics.fmean(s.prompt_tokens) + statistics.fmean(s.output_tokens) / 2, s.replay_contexts
    )
    half = _bucket(s.replay_max_batch / 2, buckets)

    def solo_interval(batch: int) -> float:
        colocated.interval(batch, mid_context, shared, 0)
        return statistics.median(
            colocated.interval(batch, mid_context, shared, 0).seconds for _ in range(s.calibration_steps)
        )

    peak_s, half_s = solo_interval(s.replay_max_batch), solo_interval(half)
    slo_s = s.slo_ms / 1e3 if s.slo_ms else s.slo_factor * peak_s
    static_units = max(0, math.floor((0.9 * slo_s - peak_s) / unit_s)) if unit_s > 0 else 0
    policies, fixed_units = list(POLICIES), 0
    if menu[-1].partitioned:  # fixed-split runs in the menu's largest split, beside the step
        fixed_costs = [colocated.idle_unit(menu[-1])[1] for _ in range(trainer.units_per_micro_batch)]
        fixed_units = max(0, math.floor(0.9 * slo_s / statistics.median(fixed_costs)))
        policies.append(SPATIAL)
    lifetime_s = statistics.fmean(s.output_tokens) * half_s
    burst_rate = s.burst_fill * s.replay_max_batch / lifetime_s
    quiet_rate = burst_rate * s.quiet_share
    arrivals = bursty_trace(
        s.seed, s.replay_s, burst_rate=burst_rate, quiet_rate=quiet_rate, period_s=s.period_s
    )
    rng = random.Random(s.seed)
    requests = [
        Request(a.at_s, rng.randint(*s.prompt_tokens), rng.randint(*s.output_tokens)) for a in arrivals
    ]
    run.log(
        f"replay: unit {unit_s * 1e3:.3f} ms, solo interval {peak_s * 1e3:.3f} ms at batch "
        f"{s.replay_max_batch} and {half_s * 1e3:.3f} ms at {half} (context {mid_context}); SLO "
        f"{slo_s * 1e3:.3f} ms; static {static_units} units/step"
        + (f", {SPATIAL} {fixed_units} in {menu[-1].name}" if SPATIAL in policies else "")
        + f"; {len(requests)} requests in "
        f"{s.replay_s:g} s (burst {burst_rate:.2f}/s, quiet {quiet_rate:.2f}/s)"
    )
    runs, failures = [], {}
    for policy in policies:
        units = fixed_units if policy == SPATIAL else static_units
        try:
            result = _replay_policy(run, colocated, policy, requests, slo_s, units, buckets)
        except Exception as exc:  # the other policies still replay, and the gain says what is missing
            traceback.print_exc()
            failures[policy] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            run.log(f"replay {policy} failed: {failures[policy]}")
            run.sync()
            continue
        runs.append(result)
        run.log(
            f"replay {policy}: attainment {_f(result['slo_attainment'], '.4f')} of requests, TPOT p99 "
            f"{_f(result['tpot_p99_ms'], '.3f')} ms, ITL p99 {_f(result['itl_p99_ms'], '.3f')} ms, "
            f"finetune {result['finetune_tokens_per_s']:.0f} "
            f"tokens/s, units by split {result['split_units']}"
        )
    gain = gain_over_best_baseline((_PolicyRun(r) for r in runs), baselines=(*BASELINES, SPATIAL))
    return {
        "duration_s": s.replay_s,
        "slo_ms": slo_s * 1e3,
        "slo_rule": f"--slo-ms {s.slo_ms:g}"
        if s.slo_ms
        else f"{s.slo_factor:g} x solo interval at batch {s.replay_max_batch}",
        "solo_interval_peak_ms": peak_s * 1e3,
        "solo_interval_half_ms": half_s * 1e3,
        "unit_ms": unit_s * 1e3,
        "static_units": static_units,
        "static_rule": "the most units whose cost fits between the solo interval at the peak batch and 90% "
        "of the SLO (tuned once, for the trace's peak)",
        "fixed_split": menu[-1].name if SPATIAL in policies else None,
        "fixed_split_units": fixed_units if SPATIAL in policies else None,
        "fixed_split_rule": "the most units whose cost in the split (they overlap the step) fits in 90% of "
        "the SLO",
        "burst_rate": burst_rate,
        "quiet_rate": quiet_rate,
        "period_s": s.period_s,
        "requests": len(requests),
        "max_batch": s.replay_max_batch,
        "contexts": list(s.replay_contexts),
        "decode_mode": decoder.mode,
        "splits": [x.name for x in menu],
        "runs": runs,
        "failures": failures,
        "gain": {"ratio": gain.ratio, "best": gain.best, "harli_holds": gain.harli_holds, "note": gain.note},
    }


class _PolicyRun:
    def __init__(self, record: dict[str, Any]):
        self.policy = record["policy"]
        attainment = record["slo_attainment"]
        self.slo_attainment = attainment if attainment is not None else math.nan
        self.finetune_tokens_per_s = record["finetune_tokens_per_s"]


def _replay_policy(run: Run, colocated: Colocated, policy: str, requests, slo_s, static_units, buckets):
    """One policy over the trace, in real time, driving ``CoLocation`` as ``srt`` does (and as
    ``benchmark.simulate.loop`` does on its simulated clock)."""
    from sglang_harli.core.colocation import CoLocation
    from sglang_harli.core.config import HarliConfig
    from sglang_harli.core.predictor import DecodeShape
    from sglang_harli.core.work import look_ahead

    s = run.settings
    trainer, partitioner = colocated.trainer, colocated.partitioner
    menu = run.menu()
    shared = menu[0]
    config = HarliConfig(
        policy=policy,  # type: ignore[arg-type]
        tpot_slo_ms=slo_s * 1e3,
        static_units=static_units,
        layers_per_unit=s.layers_per_unit,
    )
    colocation = CoLocation.from_config(config, splits={split.name: split.share for split in menu})
    if policy == "harli":  # the server's start-up profile: every unit of a micro-batch, in every split
        for split in menu:
            for _ in range(trainer.units_per_micro_batch):
                work, seconds, _ = colocated.idle_unit(split)
                colocation.predictor.observe_unit(work, seconds, split.name)
    run.sync()
    peek = look_ahead(trainer.units_per_micro_batch)
    tokens_before = trainer.tokens_trained
    pending, queue = deque(requests), deque()
    running: list[list[int]] = []  # [context, tokens still to generate, id, tokens generated]
    arrived = 0
    tpots: list[float] = []
    gaps: list[float] = []
    weights: list[int] = []
    split_units = {split.name: 0 for split in menu}
    idle_units = decode_tokens = finished = 0
    batch_time = 0.0
    chained = False
    start = time.perf_counter()
    while (now := time.perf_counter() - start) < s.replay_s:
        while pending and pending[0].at_s <= now:
            queue.append(pending.popleft())
        joined = 0
        while queue and len(running) < s.replay_max_batch:
            request = queue.popleft()
            running.append([request.prompt, request.output, arrived, 0])
            arrived += 1
            joined += 1
        if not running:
            chained = False
            colocation.idle()
            next_at = min(pending[0].at_s if pending else s.replay_s, s.replay_s)
            admission = colocation.admit(None, trainer.peek(peek))
            deadline = min(now + (admission.budget_s or 0.0), next_at)
            ran = 0
            while ran < admission.units and time.perf_counter() - start < deadline:
                work, seconds, tokens = colocated.idle_unit(shared)
                colocation.unit_done(work, seconds, split=shared.name, micro_batch_tokens=tokens)
                ran += 1
            idle_units += ran
            if not ran:
                time.sleep(max(0.0, next_at - (time.perf_counter() - start)))
            continue
        batch = len(running)
        shape = DecodeShape(batch_size=batch, context_tokens=sum(r[0] for r in running))
        step = (_bucket(batch, buckets), _bucket(shape.context_tokens / batch, s.replay_contexts))
        if chained:
            admission = colocation.admit(shape, trainer.peek(peek))
            split = partitioner.split(admission.split)
            result = colocated.interval(*step, split, admission.units)
            for work, seconds, tokens in result.units:
                colocation.unit_done(work, seconds, split=split.name, micro_batch_tokens=tokens)
            split_units[split.name] += len(result.units)
            solo = not result.units or not split.partitioned
        else:  # the first step after idle closes no interval; nothing is admitted before it
            result = colocated.interval(*step, shared, 0)
            solo = True
        record = colocation.decode_done(shape, result.step_s, solo=solo)
        if chained and record is not None and batch > joined:
            gaps.append(record.observed_ms / 1e3)
            weights.append(batch - joined)
            batch_time += batch * record.observed_ms / 1e3
        chained = True
        decode_tokens += batch
        for r in running:
            r[0] += 1
            r[1] -= 1
            r[3] += 1
        # per-request TPOT from each request's first decode token, as the server's ledger keeps it
        tpots += colocation.tokens_out([(str(r[2]), r[3], r[1] <= 0) for r in running], decode=True)
        finished += sum(1 for r in running if r[1] <= 0)
        running = [r for r in running if r[1] > 0]
    elapsed = time.perf_counter() - start
    run.sync()
    tokens = trainer.tokens_trained - tokens_before
    held = sum(w for g, w in zip(gaps, weights, strict=True) if g <= slo_s)
    stats = colocation.snapshot()
    corun = {name: st.mape_overall for name, st in stats.predictor.corun.items()}
    p50, p99 = _weighted(gaps, weights, 0.5), _weighted(gaps, weights, 0.99)
    ones = [1] * len(tpots)
    tpot_p50, tpot_p99 = _weighted(tpots, ones, 0.5), _weighted(tpots, ones, 0.99)
    return {
        "policy": policy,
        "static_units": static_units if policy in ("static", SPATIAL) else None,
        # per request, as sglang.bench_serving: (last token - first token) / (output tokens - 1)
        "slo_attainment": sum(t <= slo_s for t in tpots) / len(tpots) if tpots else None,
        "tpot_p50_ms": None if tpot_p50 is None else tpot_p50 * 1e3,
        "tpot_p99_ms": None if tpot_p99 is None else tpot_p99 * 1e3,
        "requests_finished": len(tpots),
        # every token interval, weighed by the requests that waited through it
        "itl_attainment": held / sum(weights) if weights else None,
        "itl_p50_ms": None if p50 is None else p50 * 1e3,
        "itl_p99_ms": None if p99 is None else p99 * 1e3,
        "intervals": len(gaps),
        "finetune_tokens": tokens,
        "finetune_tokens_per_s": tokens / elapsed,
        "decode_tokens_per_s": decode_tokens / elapsed,
        "mean_batch": batch_time / elapsed,
        "finished": finished,
        "split_units": split_units,
        "idle_units": idle_units,
        "margin_ms": stats.policy.margin_ms,
        "predictor_solo_mape": stats.predictor.solo.mape_overall if policy == "harli" else None,
        "predictor_corun_mape": corun if policy == "harli" else None,
    }


RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "ceilings": part_ceilings,
    "trainer": part_trainer,
    "decode": part_decode,
    "corun": part_corun,
    "replay": part_replay,
}


# -- tables -----------------------------------------------------------------------------------------------


def _f(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pct(value: float | None) -> str:
    return _f(None if value is None else 100 * value, ".1f")


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of every part that ran: printed at the end, and ``RESULTS.md``'s gpu section."""
    parts = result.get("parts", {})
    status = [[name, p.get("status", "-"), _f(p.get("seconds"), ".0f")] for name, p in parts.items()]
    blocks = [_table(["part", "status", "seconds"], status)]
    p = parts.get("ceilings", {})
    if p.get("status") == "ok":
        matmul = f"{p['matmul_tflops']:.1f} TFLOP/s (best {p['matmul_tflops_best']:.1f})"
        copy = f"{p['copy_gbps']:.0f} GB/s (best {p['copy_gbps_best']:.0f})"
        rows = [
            [f"{p['matmul_dtype']} matmul", matmul, f"{p['matmul_n']}^3, {p['timing']}"],
            ["copy bandwidth", copy, f"{p['copy_bytes'] / 2**20:.0f} MiB read + written"],
        ]
        blocks.append(_table(["ceiling", "measured", "how"], rows))
    p = parts.get("trainer", {})
    if p.get("status") == "ok":
        rows = [
            [side, str(e["repeat"]), f"{e['tokens_per_s']:.0f}", _pct(e["mfu"]), _f(e["final_loss"], ".4f"),
             _f(e["peak_memory_gib"], ".1f")]
            for side in ("ours", "reference") for e in p[side]
        ]  # fmt: skip
        blocks.append(_table(["trainer", "repeat", "tokens/s", "MFU %", "final loss", "peak GiB"], rows))
    p = parts.get("decode", {})
    if p.get("status") == "ok":
        rows = [
            [str(r["batch"]), str(r["context"]), r.get("skipped") or _f(r["step_ms"], ".3f"),
             _f(r.get("p90_ms"), ".3f"), _f(r.get("achieved_gbps"), ".0f"), _pct(r.get("bandwidth_share"))]
            for r in p["rows"]
        ]  # fmt: skip
        blocks.append(_table(["batch", "context", "step ms", "p90 ms", "GB/s", "% of copy bw"], rows))
    p = parts.get("corun", {})
    if p.get("status") == "ok":
        rows = [
            [r["split"], str(r["batch"]), str(r["context"]), str(r["units"]), _f(r["decode_ms"], ".3f"),
             _f(r["inflation"], ".2f"), _f(r["interval_ms"], ".3f"), _f(r["finetune_tokens_per_s"], ".0f")]
            for r in p["rows"]
        ]  # fmt: skip
        header = [
            "split",
            "batch",
            "context",
            "units",
            "decode ms",
            "inflation",
            "interval ms",
            "finetune tok/s",
        ]
        blocks.append(_table(header, rows))
        predictor = p["predictor"]
        corun = ", ".join(f"{k} {_pct(v)}%" for k, v in predictor["corun_mape"].items())
        blocks.append(f"predictor MAPE: solo {_pct(predictor['solo_mape'])}%; co-run {corun}")
    p = parts.get("replay", {})
    if p.get("status") == "ok":
        rows = [
            [f"`{r['policy']}`" + (f" ({r['static_units']}/step)" if r["static_units"] is not None else ""),
             _f(r["slo_attainment"], ".4f"), _f(r["tpot_p50_ms"], ".2f"), _f(r["tpot_p99_ms"], ".2f"),
             _f(r.get("itl_attainment"), ".4f"), _f(r.get("itl_p99_ms"), ".2f"),
             _f(r["finetune_tokens_per_s"], ".0f"), _f(r["mean_batch"], ".1f"),
             ", ".join(f"{k} {v}" for k, v in r["split_units"].items() if v)]
            for r in p["runs"]
        ]  # fmt: skip
        header = [
            "policy", "SLO att. (requests)", "TPOT p50 ms", "TPOT p99 ms", "ITL att.", "ITL p99 ms",
            "finetune tok/s", "mean batch", "units",
        ]  # fmt: skip
        blocks.append(_table(header, rows))
        gain = p["gain"]
        versus = f"{gain['ratio']:.2f}x over `{gain['best']}`" if gain["ratio"] is not None else "-"
        note = f" ({gain['note']})" if gain["note"] else ""
        blocks.append(
            f"replay: SLO {p['slo_ms']:.2f} ms; harli vs the best SLO-holding baseline: {versus}{note}"
        )
    return "\n\n".join(blocks)


# -- main -------------------------------------------------------------------------------------------------


def run_parts(run: Run, parts: Sequence[str]) -> dict[str, Any]:
    for name in parts:
        started = time.perf_counter()
        run.log(f"== {name} ==")
        record: dict[str, Any]
        try:
            record = {"status": "ok", **RUNNERS[name](run)}
        except Exception as exc:  # one broken part must not cost the others their figures
            traceback.print_exc()
            record = {"status": f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]}
            with contextlib.suppress(Exception):
                run.sync()
        run.free()  # what the part held (its decoder's KV cache, its trainer), not the base weights
        record["seconds"] = time.perf_counter() - started
        run.result["parts"][name] = record
        run.save()
        run.log(f"== {name}: {record['status']} ({record['seconds']:.1f} s) ==")
    return run.result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cells, 30 s replays (about 4.5 minutes)")
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU shape (automatic without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="gpu.json and gpu.log here ($OUT if set)")
    parser.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ms", type=float, default=None, help="replay SLO (default: derived)")
    parser.add_argument("--replay-s", type=float, default=None, help="replay length per policy")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in (args.only or ",".join(PARTS)).split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    cuda = torch.cuda.is_available() and not args.smoke
    mode = "smoke" if not cuda else "quick" if args.quick else "full"
    settings = make_settings(mode, args.seed, slo_ms=args.slo_ms, replay_s=args.replay_s)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    command = "python -m benchmark.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    run = Run(settings, device, out, command.strip())
    why = "" if cuda else (" (--smoke)" if args.smoke else " (no CUDA device)")
    run.log(f"benchmark.gpu {mode}{why} on {run.result['device']['name']}: {', '.join(parts)} -> {out}")
    started = time.perf_counter()
    run_parts(run, parts)
    run.result["seconds"] = time.perf_counter() - started
    path = run.save()
    print(tables(run.result), flush=True)
    run.log(f"done in {run.result['seconds']:.0f} s; {path}")
    return 0 if all(run.result["parts"][p]["status"] == "ok" for p in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
