"""The generated part of ``RESULTS.md``: every figure of ``benchmark.run`` with its verdicts.

Each part's record (``PartRecord``) carries what a reader needs to trust or redo a figure: the command,
the machine, the seed, when it ran and for how long, and per target "met" or "missed" beside the value
measured. Records live in ``results/run.json`` and are merged across runs, so ``--only simulate`` updates
the simulation and leaves the co-location figures of an earlier run in place, each still dated and
attributed. The section is rewritten between two markers; everything else in ``RESULTS.md`` is left as
written by hand.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from importlib import metadata
from pathlib import Path

import msgspec

from benchmark import colocation, overhead, simulate, verdicts

BEGIN = "<!-- benchmark.run:begin -->"
END = "<!-- benchmark.run:end -->"
TRAIN_TARGET = 1.0
MFU_TARGET = 0.45
"""Trainer MFU on the LLaMA3-8B shape, against the bf16 matmul peak measured in the same run (issue 18)."""
GPU_GAIN_TARGET = 1.46
"""harli over the best realistic SLO-holding baseline on the GPU replay (issue 18)."""
CPU_GAIN_TARGET = 1.46
SLACK_TARGET = 0.80
TRACE_SLACK_TARGET = 0.90
"""harli's share of the slack ceiling on the CPU server's real-trace replay (issue 18)."""
SOLO_MAPE_TARGET = 0.10
CORUN_MAPE_TARGET = 0.15
PART_TITLES = {
    "colocation": "Co-location on CPU (real server, all policies, several loads)",
    "colocation-smollm2": "Co-location on CPU on the real pretrained model (harli:smollm2-135m)",
    "colocation-trace": "Co-location on CPU, the real Azure code trace replayed (every baseline)",
    "colocation-trace-smollm2": "Co-location on CPU, the real Azure code trace, on harli:smollm2-135m",
    "overhead": "Overhead of Harli with no job (vanilla SGLang vs sglang_harli)",
    "train": "Trainer vs plain transformers + PEFT",
    "train-smollm2": "Trainer vs plain transformers + PEFT on the real pretrained model (harli:smollm2-135m)",
    "gpu": "GPU co-location and trainer MFU",
    "simulate": "SIMULATED: paper-scale decode instance (LLaMA3-8B shape on an H100)",
}


class Machine(msgspec.Struct, kw_only=True):
    cpu: str
    cores: int
    memory_gib: float
    gpu: str
    python: str
    torch: str
    sglang: str
    transformers: str
    peft: str

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores, {self.memory_gib:.0f} GiB, GPU: {self.gpu}; "
            f"Python {self.python}, "
            f"torch {self.torch}, sglang {self.sglang}, transformers {self.transformers}, peft {self.peft}"
        )


class Target(msgspec.Struct, kw_only=True):
    target: str
    measured: str
    verdict: str
    """``met``, ``missed``, or ``not measured: <why>`` / ``not run: <why>``."""


class PartRecord(msgspec.Struct, kw_only=True):
    part: str
    status: str
    """``ok``, ``failed: <error>`` or ``not run: <why>``."""
    command: str
    mode: str
    seed: int
    started_utc: str
    seconds: float
    estimated_s: float
    machine: Machine
    result_json: str | None = None
    plots: list[str] = msgspec.field(default_factory=list)
    targets: list[Target] = msgspec.field(default_factory=list)
    table: str = ""
    """Markdown: the part's figures."""
    notes: list[str] = msgspec.field(default_factory=list)


class Manifest(msgspec.Struct, kw_only=True):
    parts: dict[str, PartRecord] = msgspec.field(default_factory=dict)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Machine:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = math.nan
    return Machine(
        cpu=f"{_cpu_model()} ({platform.machine()})",
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        memory_gib=memory,
        gpu=gpu,
        python=platform.python_version(),
        torch=_version("torch"),
        sglang=_version("sglang"),
        transformers=_version("transformers"),
        peft=_version("peft"),
    )


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# -- per part: targets and tables -------------------------------------------------------------------------


def colocation_summary(report: colocation.Report) -> tuple[list[Target], str, list[str]]:
    settings, targets, notes = report.settings, [], []
    alone = report.measured.get("harli", {}).get("alone_tokens_per_s")
    rows = []
    traced = settings.trace is not None
    # with a real trace, static is the one tuned at its peak; the oracle is a reference, not a baseline
    baselines = verdicts.REALISTIC if traced else verdicts.BASELINES
    where = f"on the `{settings.trace}` trace " if traced else ""
    slack_target = TRACE_SLACK_TARGET if traced else SLACK_TARGET
    realistic = "realistic " if traced else ""
    for load in sorted(settings.loads):
        at_load = [r for r in report.levels if r.load == load]
        comparison = verdicts.gain_over_best_baseline(at_load, baselines=baselines)
        gain, best = comparison.ratio, comparison.best
        for r in (r for r in report.levels if r.load == load):
            rows.append(
                [
                    f"x{load:g}",
                    f"`{r.policy}`" + (f" ({r.static_units}/step)" if r.static_units else ""),
                    f"{r.requests - r.failed - r.truncated}/{r.requests} ({r.truncated} cut)",
                    _f(r.tpot_p50_ms, ".1f"),
                    _f(r.tpot_p99_ms, ".1f"),
                    _f(r.slo_attainment),
                    _f(r.itl_p99_ms, ".1f"),
                    _f(r.itl_attainment),
                    _f(r.finetune_tokens_per_s, ".0f"),
                    _f(r.forward_fraction, ".2f"),
                    _f(r.lent_mib_mean, ".1f") + " / " + _f(r.lent_mib_max, ".1f"),
                    f"{gain:.2f}x vs `{best}`" + _versus_oracle(at_load)
                    if gain is not None and r.policy == "harli"
                    else "",
                ]
            )
        harli = next((r for r in report.levels if r.load == load and r.policy == "harli"), None)
        if harli is None:
            continue
        holds = verdicts.holds_slo(harli)
        targets.append(
            Target(
                target=f"`harli` holds the SLO {where}at load x{load:g} (request attainment >= 0.99)",
                measured=_f(harli.slo_attainment),
                verdict=verdict(holds),
            )
        )
        itl = next((r for r in at_load if r.policy == "harli/itl"), None)
        if itl is not None:
            decode_alone = next((r for r in at_load if r.policy == "idle-only"), harli)
            targets.append(_tpot_over_itl(harli, itl, load, busy=decode_alone.forward_fraction))
        if settings.max_itl_ms is not None and harli.itl_p99_ms is not None:
            targets.append(
                Target(
                    target=f"`harli` ITL p99 under its hard cap (--harli-max-itl-ms {settings.max_itl_ms:g}) "
                    f"{where}at load x{load:g}",
                    measured=f"{harli.itl_p99_ms:.1f} ms",
                    verdict=verdict(harli.itl_p99_ms <= settings.max_itl_ms),
                )
            )
        ceiling = alone * (1 - harli.forward_fraction) if alone else None
        if gain is not None:
            measured = f"{gain:.2f}x over `{best}`"
            best_rate = next(
                r.finetune_tokens_per_s for r in report.levels if r.load == load and r.policy == best
            )
            if ceiling and best_rate > 0:
                # what no scheduler could beat on this machine: time-sharing cores creates no compute
                measured += f"; the slack ceiling allows {ceiling / best_rate:.2f}x"
            targets.append(
                Target(
                    target=f"`harli` >= {CPU_GAIN_TARGET}x the best {realistic}SLO-holding baseline "
                    f"{where}at load x{load:g}",
                    measured=measured + ("" if holds else " (harli itself misses the SLO)"),
                    verdict=verdict(holds and gain >= CPU_GAIN_TARGET),
                )
            )
        else:
            ran = any(r.load == load and r.policy != "harli" for r in report.levels)
            targets.append(
                Target(
                    target=f"`harli` >= {CPU_GAIN_TARGET}x the best {realistic}SLO-holding baseline "
                    f"{where}at load x{load:g}",
                    measured="no baseline holds the SLO" if ran else "-",
                    verdict=("met" if holds else "missed") if ran else "not measured: no baseline ran",
                )
            )
        if ceiling is not None:
            share = harli.finetune_tokens_per_s / ceiling if ceiling > 0 else math.nan
            targets.append(
                Target(
                    target=f"`harli` >= {slack_target:.0%} of the slack ceiling {where}at load x{load:g}",
                    measured=f"{share:.2f} ({harli.finetune_tokens_per_s:.0f} of {ceiling:.0f} tokens/s)",
                    verdict=verdict(share >= slack_target),
                )
            )
        peak = next((r for r in at_load if r.policy == "static/peak"), None)
        if traced and peak is not None:
            targets.append(_beats_static_peak(harli, peak, ceiling, load))
    harli_rows = [r for r in report.levels if r.policy == "harli"]
    if harli_rows:
        last = max(harli_rows, key=lambda r: r.load)
        for stage, value, limit in (
            ("solo", last.predictor_solo_mape, SOLO_MAPE_TARGET),
            ("co-run", last.predictor_corun_mape, CORUN_MAPE_TARGET),
        ):
            targets.append(
                Target(
                    target=f"predictor MAPE {stage} <= {limit:.0%} (`harli` run, overall)",
                    measured=_f(None if value is None else 100 * value, ".1f") + "%",
                    verdict="not measured: no samples" if value is None else verdict(value <= limit),
                )
            )
    table = _table(
        ["load", "policy", "complete", "TPOT p50 ms", "TPOT p99 ms", "SLO att. (requests)", "ITL p99 ms",
         "ITL att.", "finetune tok/s", "decode busy", "lent MiB mean / max", "harli vs best"],
        rows,
    )  # fmt: skip
    if alone:
        notes.append(
            f"Finetune alone (harli server, no decode, {settings.alone_s:g} s): {alone:.0f} tokens/s."
        )
    static = "static/peak" if traced else "static"
    tuning = report.measured.get(static, {}).get("tuning")
    if tuning:
        notes.append(
            f"`{static}` tuned so the SLO holds at peak load (x{tuning[0]['load']:g}, probed alone in a "
            f"server of its own, stepping down from the estimate): {_tries(tuning)}; measured with "
            f"{tuning[-1]['units']}/step."
        )
    oracle = report.measured.get("static/oracle", {}).get("tuning")
    if oracle:
        chosen = next((r.static_units for r in report.levels if r.policy == "static/oracle"), None)
        notes.append(
            "`static/oracle` tuned on the scored trace itself (a reference no operator can reach, not a "
            f"baseline; the lowest level's attainment per try, `static/peak`'s scored run first): "
            f"{_tries(oracle)}; shown with {chosen}/step."
        )
    drain = (
        "every request ran to completion"
        if settings.max_drain_s is None
        else f"requests still streaming {settings.max_drain_s:g} s after it were cut"
    )
    arrivals = (
        f"Poisson arrivals (x load: {settings.burst_rate}/s in the first third of every "
        f"{settings.period_s:g} s, {settings.quiet_rate}/s otherwise)"
    )
    if settings.trace is not None:
        span = "to its end" if settings.trace_span_s is None else f"for {settings.trace_span_s:g} s"
        arrivals = (
            f"the real trace `{settings.trace}` (`benchmark/traces`, CC-BY 4.0; recorded from "
            f"{settings.trace_start_s:g} s {span}) squeezed into it and thinned to the long-run mean rate of "
            f"{arrivals}; `static/peak` tuned on a constant-rate window at the trace's peak minute's rate"
        )
    cap = settings.max_itl_ms
    cap = "" if cap is None else f" (`harli` with `--harli-max-itl-ms {cap:g}`)"
    notes.append(
        f"Model `harli:{settings.model}`, SLO {settings.slo_ms:g} ms{cap}, held per request by `harli` and "
        "judged per request for every policy (TPOT as `sglang.bench_serving` computes it; `harli/itl` holds "
        f"every token interval instead); each level a {settings.duration_s:g} s "
        f"window of {arrivals}; {drain}. One fresh server per policy with a finetune job running, levels "
        "light to heavy."
    )
    return targets, table, notes


TPOT_OVER_ITL_TARGET = 1.3
"""harli holding per-request TPOT over harli holding every interval, where decode is busy (issue 21)."""


def _tpot_over_itl(harli, itl, load: float, *, busy: float) -> Target:
    """Issue 21: holding per-request TPOT trains at least 1.3x what holding every interval does, at the
    same SLO, where decode is busy more than half the time (``busy``: the share of the window decode
    alone spends in forward passes, ``idle-only``'s, a property of the load rather than of a policy);
    it must hold per-request attainment too."""
    ratio = harli.finetune_tokens_per_s / itl.finetune_tokens_per_s if itl.finetune_tokens_per_s > 0 else None
    measured = "-" if ratio is None else f"{ratio:.2f}x `harli/itl`"
    measured += f"; decode alone busy {busy:.0%} of the time"
    if not verdicts.holds_slo(harli):
        measured += " (harli misses per-request attainment)"
    if ratio is None:
        outcome = "not measured: `harli/itl` trained nothing"
    elif busy <= 0.5:
        outcome = "not measured: decode busy under half the time"
    else:
        outcome = verdict(verdicts.holds_slo(harli) and ratio >= TPOT_OVER_ITL_TARGET)
    return Target(
        target=f"`harli` (tpot) >= {TPOT_OVER_ITL_TARGET}x `harli/itl` at the same SLO where decode is busy "
        f"over half the time, load x{load:g}",
        measured=measured,
        verdict=outcome,
    )


def _tries(probes: list[dict]) -> str:
    return ", ".join(
        f"{p['units']}/step {p['slo_attainment']:.3f} "
        f"({'holds' if p['slo_attainment'] >= verdicts.ATTAINMENT_TARGET else 'misses'})"
        for p in probes
    )


def _versus_oracle(runs: list[colocation.LevelResult]) -> str:
    oracle = verdicts.gain_over_best_baseline(runs, baselines=verdicts.ORACLE)
    return "" if oracle.ratio is None else f"; {oracle.ratio:.2f}x vs `static/oracle`"


def _beats_static_peak(
    harli: colocation.LevelResult, peak: colocation.LevelResult, ceiling: float | None, load: float
) -> Target:
    """Issue 18: on a real trace harli beats ``static`` tuned at the trace's peak wherever the slack
    ceiling leaves room to (more than 5% above what ``static/peak`` trains)."""
    room = ceiling / peak.finetune_tokens_per_s if ceiling and peak.finetune_tokens_per_s > 0 else None
    trains = peak.finetune_tokens_per_s > 0
    ratio = harli.finetune_tokens_per_s / peak.finetune_tokens_per_s if trains else None
    measured = "-" if ratio is None else f"{ratio:.2f}x `static/peak`"
    if room is not None:
        measured += f"; the slack ceiling allows {room:.2f}x"
    if ratio is None:
        outcome = "not measured: `static/peak` trains nothing"
    elif room is not None and room <= 1.05:
        outcome = "met" if verdicts.holds_slo(harli) else "missed"
        measured += " (no room to beat it)"
    else:
        outcome = verdict(verdicts.holds_slo(harli) and ratio > 1.0)
    return Target(
        target=f"`harli` beats `static/peak` on the trace where the slack ceiling allows, at load x{load:g}",
        measured=measured + ("" if verdicts.holds_slo(harli) else " (harli itself misses the SLO)"),
        verdict=outcome,
    )


def overhead_summary(report: overhead.Report) -> tuple[list[Target], str, list[str]]:
    rows = [
        [str(r.index), r.side, f"{r.requests - r.failed}/{r.requests}", _f(r.tpot_p50_ms, ".1f"),
         _f(r.tpot_mean_ms, ".1f"), _f(r.tpot_p99_ms, ".1f"), _f(r.output_tokens_per_s, ".1f")]
        for r in report.runs
    ]  # fmt: skip
    table = _table(
        ["run", "server", "complete", "TPOT p50 ms", "TPOT mean ms", "TPOT p99 ms", "tokens/s"], rows
    )
    pairs = "; ".join(
        f"runs {p.runs}: TPOT x{p.tpot_p50:.3f}, throughput x{p.throughput:.3f}" for p in report.pairs
    )
    measured = (
        f"TPOT p50 x{report.median_tpot_ratio:.3f}, throughput x{report.median_throughput_ratio:.3f} "
        f"(harli/vanilla, median of {len(report.pairs)} pairs): {report.slowdown:+.1%}"
    )
    target = Target(
        target="Harli with no job <= 2% slower than vanilla SGLang",
        measured=measured,
        verdict=verdict(report.met),
    )
    notes = [
        f"Order {' '.join(r.side for r in report.runs)}; pair ratios: {pairs}.",
        f"Vanilla: `python -m sglang.launch_server {' '.join(report.flags['vanilla'])}`; Harli: "
        f"`python -m sglang_harli.launch_server {' '.join(report.flags['harli'])}`.",
    ]
    return [target], table, notes


def train_summary(result: dict) -> tuple[list[Target], str, list[str]]:
    rows = [
        [str(r["repeat"]), r["first"], str(r["tokens"]), f"{r['ours_tokens_per_s']:.1f}",
         f"{r['reference_tokens_per_s']:.1f}", f"{r['ratio']:.3f}"]
        for r in result["repeats"]
    ]  # fmt: skip
    table = _table(["repeat", "first", "tokens", "ours tok/s", "reference tok/s", "ours/reference"], rows)
    ratio = result["median_ratio"]
    targets = [
        Target(
            target=f"trainer tokens/s >= {TRAIN_TARGET:g}x plain transformers + PEFT (`{result['model']}`)",
            measured=f"{ratio:.3f} (median of {len(result['repeats'])})",
            verdict=verdict(ratio >= TRAIN_TARGET),
        ),
    ]  # MFU is the `gpu` part's target
    notes = [
        f"{result['examples']} examples, max_seq_len {result['max_seq_len']}, micro-batch "
        f"{result['micro_batch_size']}, {result['dtype']} on {result['device']}, torch threads "
        f"{result['torch_threads']}; load average after "
        + ", ".join(f"{x:.2f}" for x in result["load_average_after"])
        + "."
    ]
    return targets, table, notes


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
    from benchmark import gpu as gpu_benchmark

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
    failed = [f for f in map(failure, gpu_benchmark.PARTS) if f]
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
    return [mfu, gain], gpu_benchmark.tables(result), notes


def simulate_summary(report: simulate.Report) -> tuple[list[Target], str, list[str]]:
    rows = []
    for result in report.loads:
        for r in result.runs:
            rows.append(
                [
                    f"{result.load:g}",
                    str(result.seed),
                    f"`{r.policy}`" + (f" ({r.static_units}/step)" if r.static_units is not None else ""),
                    _f(r.finetune_tokens_per_s, ".0f"),
                    _f(r.slo_attainment, ".4f"),
                    _f(r.tpot_p99_ms, ".1f"),
                    _f(r.itl_attainment, ".4f"),
                    _f(r.itl_p99_ms, ".1f"),
                    _f(r.mean_batch, ".0f"),
                    f"{result.gain:+.1%} vs `{result.best_baseline}`"
                    if r.policy == "harli" and result.gain is not None
                    else (result.note if r.policy == "harli" else ""),
                ]
            )
    table = _table(
        ["load", "seed", "policy", "finetune tok/s", "SLO att. (requests)", "TPOT p99 ms", "ITL att.",
         "ITL p99 ms", "mean batch", "harli gain"],
        rows,
    )  # fmt: skip
    harli = [r for lr in report.loads for r in lr.runs if r.policy == "harli"]
    worst = min((r.slo_attainment for r in harli), default=math.nan)
    average = report.average_gain
    by_load = simulate.gains_by_load(report)
    per_load = ", ".join(f"{load:g}: {100 * sum(g) / len(g):+.1f}%" for load, g in by_load.items())
    targets = [
        Target(
            target="SIMULATED: `harli` holds the SLO (>= 0.99) at every load",
            measured=f"lowest {worst:.4f}",
            verdict=verdict(worst >= verdicts.ATTAINMENT_TARGET),
        ),
        Target(
            target=f"SIMULATED: average gain over the best SLO-holding baseline >= the paper's "
            f"+{simulate.PAPER_AVERAGE_GAIN:.1%} (up to +{simulate.PAPER_MAX_GAIN:.1%})",
            measured=(
                "-"
                if average is None
                else f"{average:+.1%} average, {report.max_gain:+.1%} max (per load: {per_load})"
            ),
            verdict="missed" if average is None else verdict(average >= simulate.PAPER_AVERAGE_GAIN),
        ),
        *_simulated_tpot_over_itl(report),
    ]
    steps = ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in report.solo_step_ms.items())
    notes = [
        f"SIMULATED, not measured: {report.gpu.name}, LLaMA3-8B shape, roofline step model and interference "
        f"model documented in `benchmark/simulate/model.py`. Decode step alone at 1k-token contexts: "
        f"{steps}. "
        f"KV pool {report.kv_pool_tokens} tokens; finetune alone {report.finetune_alone_tokens_per_s:.0f} "
        f"tokens/s; load 1.0 = {report.saturation_rate:.1f} requests/s; SLO {report.settings.slo_ms:g} ms; "
        f"{report.settings.duration_s:g} simulated s per run, seeds {report.settings.seeds}; "
        f"{report.seconds:.0f} s of wall time.",
        "`static` is tuned per load on the very trace it is scored on (the largest units/step that holds the "
        "SLO): the strongest static baseline there can be. `harli/shared` is harli without SM partitions "
        "(time-sharing only), shown to separate what the splits add from what adaptivity adds. `harli/itl` "
        "is harli holding every token interval instead of each request's TPOT. The SLO columns are per "
        "request as `sglang.bench_serving` reports TPOT; ITL is every token interval, weighed by the "
        "requests that waited through it.",
    ]
    if report.replays:
        trace_targets, trace_table, trace_notes = _simulate_trace_summary(report.replays)
        targets += trace_targets
        table = f"{table}\n\n{trace_table}" if report.loads else trace_table
        notes += trace_notes
    return targets, table, notes


def _simulated_tpot_over_itl(report: simulate.Report) -> list[Target]:
    """Issue 21 at paper scale: harli holding per-request TPOT against harli holding every interval, at
    the loads of half the saturation rate and more (the simulator's stand-in for "decode busy more than
    half the time": a decode instance is never idle there)."""
    pairs = []
    for result in report.loads:
        runs = {r.policy: r for r in result.runs}
        if "harli" in runs and "harli/itl" in runs and result.load >= 0.5:
            pairs.append((runs["harli"], runs["harli/itl"]))
    if not pairs:
        return []
    ratios = [t.finetune_tokens_per_s / i.finetune_tokens_per_s for t, i in pairs if i.finetune_tokens_per_s]
    holds = all(verdicts.holds_slo(t) for t, _ in pairs)
    average = sum(ratios) / len(ratios) if ratios else None
    measured = "-" if average is None else f"{average:.2f}x average ({min(ratios):.2f}-{max(ratios):.2f}x)"
    return [
        Target(
            target=f"SIMULATED: `harli` (tpot) >= {TPOT_OVER_ITL_TARGET}x `harli/itl` at loads >= 0.5, "
            "per-request attainment held",
            measured=measured + ("" if holds else "; harli misses per-request attainment somewhere"),
            verdict="missed" if average is None else verdict(holds and average >= TPOT_OVER_ITL_TARGET),
        )
    ]


TRACE_ORACLE_TARGET = 0.10
"""harli's gain over ``static`` tuned on the very trace it is scored on (issue 18)."""


def _simulate_trace_summary(replays: list[simulate.TraceResult]) -> tuple[list[Target], str, list[str]]:
    """The real-trace replay: every policy, harli's gain over the best realistic baseline and the oracle."""
    rows = []
    for result in replays:
        for r in result.runs:
            split = result.tuning.fixed_split if r.policy == "fixed-split/peak" else ""
            units = (
                "" if r.static_units is None else f" ({r.static_units}/step{' in ' + split if split else ''})"
            )
            gains = ""
            if r.policy == "harli":
                gains = (
                    f"{result.gain:+.1%} vs `{result.best_baseline}`"
                    if result.gain is not None
                    else result.note
                )
                oracle = (
                    f"{result.oracle_gain:+.1%}" if result.oracle_gain is not None else result.oracle_note
                )
                gains += f"; {oracle} vs oracle"
            rows.append(
                [
                    result.trace,
                    str(result.seed),
                    f"`{r.policy}`{units}",
                    _f(r.finetune_tokens_per_s, ".0f"),
                    _f(r.slo_attainment, ".4f"),
                    _f(r.tpot_p99_ms, ".1f"),
                    gains,
                ]
            )
    table = _table(
        ["trace", "seed", "policy", "finetune tok/s", "SLO att.", "TPOT p99 ms", "harli gain"], rows
    )
    first = replays[0]
    harli = [r for result in replays for r in result.runs if r.policy == "harli"]
    worst = min((r.slo_attainment for r in harli), default=math.nan)
    gains = [result.gain for result in replays if result.gain is not None]
    oracle = [result.oracle_gain for result in replays if result.oracle_gain is not None]
    per_seed = ", ".join(
        f"seed {result.seed}: {result.gain:+.1%} over `{result.best_baseline}`"
        if result.gain is not None
        else f"seed {result.seed}: {result.note}"
        for result in replays
    )
    name = f"SIMULATED, trace {first.trace}"
    targets = [
        Target(
            target=f"{name}: `harli` holds the SLO (>= 0.99)",
            measured=f"lowest {worst:.4f}",
            verdict=verdict(worst >= verdicts.ATTAINMENT_TARGET),
        ),
        Target(
            target=f"{name}: average gain over the best realistic SLO-holding baseline >= "
            f"+{simulate.PAPER_AVERAGE_GAIN:.1%}",
            measured=f"{sum(gains) / len(gains):+.1%} average ({per_seed})" if gains else per_seed,
            verdict=verdict(bool(gains) and sum(gains) / len(gains) >= simulate.PAPER_AVERAGE_GAIN),
        ),
        Target(
            target=f"{name}: average gain over the oracle `static` (tuned on the scored trace) >= "
            f"+{TRACE_ORACLE_TARGET:.0%}",
            measured=(
                f"{sum(oracle) / len(oracle):+.1%} average"
                if oracle
                else "; ".join(result.oracle_note for result in replays)
            ),
            verdict=verdict(bool(oracle) and sum(oracle) / len(oracle) >= TRACE_ORACLE_TARGET),
        ),
    ]
    notes = [
        f"Trace replay: {first.trace}, {first.source}; recorded window {first.start_s:g}-"
        f"{first.start_s + first.span_s:.0f} s ({first.requests} requests; mean prompt "
        f"{first.lengths.prompt_mean:.0f}, output {first.lengths.output_mean:.0f} tokens after clipping) "
        f"time-scaled x{first.time_scale:.3f} to a mean {first.arrival_rate:.1f} requests/s = load "
        f"{first.load:g} of this mix's saturation rate ({first.capacity_rate:.1f}/s); its busiest recorded "
        f"minute runs at {first.peak_rate:.1f}/s ({first.peak_rate / first.capacity_rate:.2f} of it), "
        f"{first.duration_s:.0f} simulated s per run. Realistic baselines: `idle-only`, `naive`, "
        f"`static/peak` ({first.tuning.static_peak_units}/step) and `fixed-split/peak` (MPS-style, "
        f"{first.tuning.fixed_split_units}/step in {first.tuning.fixed_split}), both tuned on a "
        "constant-rate window at the peak rate with the trace's request mix, as an operator must tune "
        f"before the load arrives; `static/oracle` ({first.tuning.oracle_units}/step) is tuned on the scored "
        f"trace itself, a reference no deployment can reach (seed {first.seed}'s tuning shown).",
    ]
    return targets, table, notes


# -- rendering --------------------------------------------------------------------------------------------


def render(manifest: Manifest, results_md: Path) -> str:
    lines = [
        "## Generated by `python -m benchmark.run`",
        "",
        "Written by `benchmark/report.py` from `benchmark/results/run.json`; edits here are overwritten. "
        "Each part says when and where it ran; parts not re-run keep their last figures.",
        "",
        "### Targets",
        "",
    ]
    rows = []
    for name in PART_TITLES:
        part = manifest.parts.get(name)
        if part is None:
            continue
        if part.status != "ok" and not part.targets:
            rows.append([name, PART_TITLES[name], "-", part.status])
        for target in part.targets:
            rows.append([name, target.target, target.measured, f"**{target.verdict}**"])
    lines += [_table(["part", "target", "measured", "verdict"], rows), ""]
    for name, title in PART_TITLES.items():
        part = manifest.parts.get(name)
        if part is None:
            continue
        lines += [f"### {title}", ""]
        lines += [
            f"- Command: `{part.command}` ({part.mode} mode, seed {part.seed})",
            f"- Ran: {part.started_utc}, {part.seconds:.0f} s (estimated {part.estimated_s:.0f} s); "
            f"status: {part.status}",
            f"- Machine: {part.machine.describe()}",
        ]
        if part.result_json:
            lines.append(f"- Raw figures: `{part.result_json}`")
        lines += [f"- {note}" for note in part.notes]
        lines.append("")
        if part.table:
            lines += [part.table, ""]
        for plot in part.plots:
            relative = os.path.relpath(plot, results_md.parent)
            lines += [f"![{Path(plot).stem}]({relative})", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_results_md(path: Path, body: str) -> None:
    """Replace what lies between the markers (appending them at the end the first time)."""
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def load_manifest(path: Path) -> Manifest:
    if not path.exists():
        return Manifest()
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Manifest()  # an older or broken manifest: start over rather than fail the run


def save_manifest(path: Path, manifest: Manifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=1))
