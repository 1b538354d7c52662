"""The ``gpu`` part of ``benchmark.run``: ``benchmark.gpu``'s figures as the issue-18 targets on a lent
GPU, with the tables and notes of its ``RESULTS.md`` section. It imports msgspec (through
``benchmark.report``), so ``benchmark.gpu`` itself never imports this module."""

from __future__ import annotations

from benchmark.gpu.settings import PARTS
from benchmark.gpu.tables import tables
from benchmark.report import Target, _f, verdict

MFU_TARGET = 0.45
"""Trainer MFU on the LLaMA3-8B shape, against the bf16 matmul peak measured in the same run (issue 18)."""
GPU_GAIN_TARGET = 1.46
"""harli over the best realistic SLO-holding baseline on the GPU replay (issue 18)."""


def gpu_summary(result: dict | None, gpu: str) -> tuple[list[Target], str, list[str]]:
    """``benchmark.gpu``'s figures (``None``: it did not run) as the issue-18 targets on a lent GPU."""
    mfu_target = (
        f"trainer MFU >= {MFU_TARGET:.0%} of the measured bf16 matmul peak (LLaMA3-8B shape, random bf16 "
        "weights, LoRA r=16 on all seven projections, sequences 1,024-2,048)"
    )
    gain_target = (
        f"`harli` >= {GPU_GAIN_TARGET}x the best realistic SLO-holding baseline on the GPU replay, "
        "p99 TPOT held"
    )
    if result is None:
        why = "not run: no GPU lent" if gpu == "none" else f"not run: benchmark.gpu did not run on {gpu}"
        return [Target(target=t, measured="-", verdict=why) for t in (mfu_target, gain_target)], "", []
    parts = result["parts"]

    def failure(name: str) -> str | None:
        status = parts.get(name, {}).get("status", "not run")
        return None if status == "ok" else f"`{name}` part {status}"

    trainer, replay = parts.get("trainer", {}), parts.get("replay", {})
    if failure("trainer") or trainer.get("mfu") is None:
        why = failure("trainer") or failure("ceilings") or "no measured peak"
        mfu = Target(target=mfu_target, measured="-", verdict=f"not measured: {why}")
    else:
        mfu = Target(
            target=mfu_target,
            measured=f"{trainer['mfu']:.1%} ({trainer['ours_tokens_per_s']:.0f} tokens/s x "
            f"{trainer['flops_per_token'] / 1e9:.1f} GFLOP/token over {trainer['peak_tflops']:.0f} TFLOP/s); "
            f"transformers + PEFT {trainer['reference_mfu']:.1%}",
            verdict=verdict(trainer["mfu"] >= MFU_TARGET),
        )
    harli = next((r for r in replay.get("runs", []) if r["policy"] == "harli"), None)
    if failure("replay") or harli is None:
        why = failure("replay") or f"the harli replay failed: {replay['failures'].get('harli')}"
        gain = Target(target=gain_target, measured="-", verdict=f"not measured: {why}")
    else:
        comparison = replay["gain"]
        attainment, p99 = _f(harli["slo_attainment"], ".4f"), _f(harli["tpot_p99_ms"], ".2f")
        detail = f"harli attainment {attainment}, TPOT p99 {p99} ms, SLO {replay['slo_ms']:.2f} ms"
        if comparison["ratio"] is not None:
            measured = f"{comparison['ratio']:.2f}x over `{comparison['best']}` ({detail})"
            met = comparison["harli_holds"] and comparison["ratio"] >= GPU_GAIN_TARGET
        elif comparison["best"] is None:
            measured, met = f"no baseline holds the SLO ({detail})", comparison["harli_holds"]
        else:
            measured, met = f"{comparison['note']} ({detail})", False
        gain = Target(target=gain_target, measured=measured, verdict=verdict(met))
    device = result["device"]
    versions = ", ".join(f"{k} {device.get(k, '-')}" for k in ("torch", "cuda", "transformers", "peft"))
    notes = [
        f"`{result['command']}` ({result['mode']}) on {device.get('name')} ({device.get('sms', '-')} SMs), "
        f"{versions}; {result.get('seconds', 0):.0f} s.",
        "MFU counts the FLOPs training needs (`benchmark.gpu.training_flops`): frozen base layers forward "
        "and input gradients, LoRA forward and both gradients, causal attention, the LM head at target "
        "positions only; both sides against the same count.",
    ]
    failed = [f for f in map(failure, PARTS) if f]
    if failed:
        notes.append("Failed: " + "; ".join(failed) + ".")
    corun = parts.get("corun", {})
    if corun.get("status") == "ok":
        partitions = corun["partitions"]
        notes.append(
            f"Splits: {', '.join(s['name'] for s in corun['splits'])} ({partitions.get('kind')}"
            + (f"; {partitions['reason']}" if partitions.get("reason") else "")
            + f"); decode {corun['decode_mode']}."
        )
    if replay.get("status") == "ok":
        spatial = (
            f"; `fixed-split` {replay['fixed_split_units']} units/step in {replay['fixed_split']} "
            f"({replay['fixed_split_rule']})"
            if replay.get("fixed_split")
            else ""
        )
        notes.append(
            f"Replay: {replay['duration_s']:g} s per policy, {replay['requests']} requests (bursty, "
            f"{replay['burst_rate']:.2f}/s for the first third of every {replay['period_s']:g} s, "
            f"{replay['quiet_rate']:.2f}/s otherwise), at most {replay['max_batch']} running; SLO "
            f"{replay['slo_ms']:.2f} ms ({replay['slo_rule']}); `static` {replay['static_units']} units/step "
            f"({replay['static_rule']}){spatial}."
        )
    for name in ("corun", "replay"):
        if parts.get(name, {}).get("failures"):
            failures = "; ".join(f"`{k}`: {v}" for k, v in parts[name]["failures"].items())
            notes.append(f"`{name}` failed for {failures}.")
    return [mfu, gain], tables(result), notes
