"""What a run measures and at which shape: the parts, the policies replayed, the model shapes and
``Settings`` for each mode (``make_settings``: ``full`` and ``quick`` on CUDA, ``smoke`` anywhere)."""

from __future__ import annotations

import dataclasses
from typing import Any

PARTS = ("ceilings", "trainer", "decode", "corun", "replay")
POLICIES = ("harli", "idle-only", "naive", "static")
SPATIAL = "fixed-split"
"""The MPS-style baseline (one SM split, fixed units, tuned once for the peak): replayed too where the
menu has partitions, and counted among the realistic baselines."""
GIB = 2**30


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
            replay_s=6.0,  # a busy host (the engine-free tier beside it) still completes micro-batches
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
