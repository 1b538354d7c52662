"""The ``trainer`` part: ``LoraTrainer`` beside plain transformers + PEFT on the same weights and
examples, tokens/s and MFU against the measured peak."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from benchmark.gpu.device import Run
from benchmark.gpu.model import lora_spec, make_examples, training_flops
from benchmark.gpu.settings import GIB


def part_trainer(run: Run) -> dict[str, Any]:
    from benchmark.train_throughput import WARMUP_STEPS, run_ours, train_reference
    from sglang_harli.core.jobs.spec import TrainingSpec
    from sglang_harli.core.training.trainer import plan_steps

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
