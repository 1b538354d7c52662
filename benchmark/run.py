"""``python -m benchmark.run``: every figure behind the claim, one part after another, into ``RESULTS.md``.

Parts, run strictly in sequence (never two servers at once: the benchmark machine may have two cores):

- ``colocation``: every policy on the real CPU server at several load levels (``benchmark.colocation``);
  plots throughput against SLO attainment, and the ``harli`` timeline.
- ``colocation-trace`` (and ``-smollm2``): the same servers replaying the real Azure code trace (issue 18):
  ``harli`` against ``idle-only``, ``naive``, ``static`` tuned at the trace's peak, and the oracle ``static``
  tuned on the scored trace itself.
- ``overhead``: vanilla SGLang against Harli with no job, A B B A (``benchmark.overhead``).
- ``train``: the trainer against plain transformers + PEFT (``benchmark.train_throughput``, in its own
  process so its threads and memory start clean).
- ``gpu``: GPU co-location and trainer MFU (``benchmark.gpu``, in its own process) on a CUDA machine;
  recorded as "not run: no GPU lent" without one. On a lent GPU, ``--out $OUT`` there, then ``--merge``
  here with the ``run.json`` it wrote, records it beside the other parts (``benchmark/README.md``).
- ``simulate``: the SIMULATED paper-scale decode instance (``benchmark.simulate``), gain against load.

Raw results go to ``--out`` (``benchmark/results``) as JSON, plots to ``<out>/plots``, and each part's
record (command, machine, seed, timing, targets met or missed) to ``<out>/run.json``, from which the
section of ``RESULTS.md`` between its markers is regenerated after every part. ``--quick`` is sized to
finish within 50 minutes on a 2-core CPU; its budget is computed from the parts' own settings (trace
windows, drains, server start-ups) and printed before anything starts (``--plan`` prints only that).

    python -m benchmark.run --quick
    python -m benchmark.run                                   # full: more loads, longer, more repeats
    python -m benchmark.run --quick --only simulate,overhead --seed 1
    python -m benchmark.run --merge /work/.device/<call>/run.json   # a lent GPU's run, recorded here
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import msgspec

from benchmark import colocation, overhead, report, simulate

ROOT = Path(__file__).resolve().parent.parent
PARTS = (
    "colocation",
    "colocation-smollm2",
    "colocation-trace",
    "colocation-trace-smollm2",
    "overhead",
    "train",
    "train-smollm2",
    "gpu",
    "simulate",
)
REAL_MODEL = "smollm2-135m"
"""The real pretrained preset measured beside the random-weight ``small``: 30 thin layers (hidden 576)
instead of 8 wide ones, tied embeddings and a 49k vocabulary, so per-unit overheads weigh more."""
DEFAULT_OUT = ROOT / "benchmark" / "results"
DEFAULT_RESULTS_MD = ROOT / "benchmark" / "RESULTS.md"
REPORT_S = 10.0
"""Plots and RESULTS.md, for the whole run."""


class Plan(msgspec.Struct, kw_only=True):
    """Every part's settings for one mode, and what each costs by construction."""

    mode: str
    colocation: colocation.Settings
    colocation_real: colocation.Settings
    colocation_trace: colocation.Settings
    """The real trace replayed on ``small``, every baseline (issue 18)."""
    colocation_trace_real: colocation.Settings
    """The same measurement on ``REAL_MODEL``."""
    overhead: overhead.Settings
    train_args: list[str]
    train_real_args: list[str]
    train_estimate_s: float
    """Measured on the 2-core machine while quiet: model set-up plus 3 repeats x 2 sides of one epoch."""
    simulate: simulate.Settings
    simulate_estimate_s: float
    """Measured here: about 3 s of CPU per load level and seed for each 90 simulated seconds."""
    gpu_args: list[str]
    gpu_estimate_s: float
    """``benchmark.gpu`` on an H200 by its own settings (replays of 5 policies, fixed-split included where
    there are SM partitions, x 60 s, or 30 s quick, plus about 2.5 minutes of set-up, ceilings, trainer,
    decode and co-run tables); 1 s without CUDA, where the part is only recorded as not run."""

    def estimates(self) -> dict[str, float]:
        return {
            "colocation": colocation.estimate_s(self.colocation),
            "colocation-smollm2": colocation.estimate_s(self.colocation_real),
            "colocation-trace": colocation.estimate_s(self.colocation_trace),
            "colocation-trace-smollm2": colocation.estimate_s(self.colocation_trace_real),
            "overhead": overhead.estimate_s(self.overhead),
            "train": self.train_estimate_s,
            "train-smollm2": self.train_estimate_s,
            "gpu": self.gpu_estimate_s,
            "simulate": self.simulate_estimate_s,
        }


def make_plan(quick: bool, seed: int) -> Plan:
    if quick:
        sim = msgspec.structs.replace(simulate.QUICK, seeds=[seed, seed + 1])
        # harli:small holds the SLO per request with a hard cap on any one interval (issue 21); the
        # real model's parts run without one
        quick_colocation = colocation.Settings(
            loads=[0.5, 1.0, 1.5], duration_s=12.0, max_drain_s=3.0, warmup_s=3.0, alone_s=4.0, seed=seed,
            max_itl_ms=500.0,
        )  # fmt: skip
        return Plan(
            mode="quick",
            colocation=quick_colocation,
            # one load level (the trace's x1) keeps the quick suite near 20 minutes with both models
            colocation_real=_on_real_model(msgspec.structs.replace(quick_colocation, loads=[1.0])),
            colocation_trace=(quick_trace := _on_trace(quick_colocation, duration_s=30.0, oracle_probes=2)),
            colocation_trace_real=_on_real_model(quick_trace),
            overhead=overhead.Settings(rounds=1, duration_s=8.0, batch=8, batch_tokens=32, seed=seed),
            train_args=["--model", "small", "--examples", "24", "--max-seq-len", "128", "--repeats", "3"],
            train_real_args=[
                "--model",
                REAL_MODEL,
                "--examples",
                "24",
                "--max-seq-len",
                "128",
                "--repeats",
                "3",
            ],
            train_estimate_s=70.0,
            simulate=sim,
            simulate_estimate_s=_simulate_estimate(sim),
            gpu_args=["--quick"],
            gpu_estimate_s=270.0 if _cuda() else 1.0,
        )
    sim = msgspec.structs.replace(simulate.FULL, seeds=[seed, seed + 1, seed + 2])
    full_colocation = colocation.Settings(
        loads=[0.25, 0.5, 0.75, 1.0, 1.25, 1.5], duration_s=60.0, max_drain_s=10.0, seed=seed,
        max_itl_ms=500.0,
    )  # fmt: skip
    return Plan(
        mode="full",
        colocation=full_colocation,
        colocation_real=_on_real_model(full_colocation),
        colocation_trace=(full_trace := _on_trace(full_colocation, duration_s=60.0, oracle_probes=3)),
        colocation_trace_real=_on_real_model(full_trace),
        overhead=overhead.Settings(rounds=2, duration_s=30.0, seed=seed),
        train_args=["--model", "small", "--repeats", "3"],
        train_real_args=["--model", REAL_MODEL, "--repeats", "3"],
        train_estimate_s=240.0,
        simulate=sim,
        simulate_estimate_s=_simulate_estimate(sim),
        gpu_args=[],
        gpu_estimate_s=450.0 if _cuda() else 1.0,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _on_real_model(settings: colocation.Settings) -> colocation.Settings:
    # Its 30 layers make a decode step slower than small's 8 on 2 cores, so the SLO is set higher: about
    # twice vanilla SGLang's p99 TPOT on it (279 ms measured with bench_serving, issue 21).
    return msgspec.structs.replace(settings, model=REAL_MODEL, slo_ms=300.0, max_itl_ms=None)


def _on_trace(settings: colocation.Settings, *, duration_s: float, oracle_probes: int) -> colocation.Settings:
    # ten recorded minutes (its first: a quiet start, two bursts of several times the mean rate, a lull)
    # squeezed into the window at the bursty level's mean rate; one load, as the trace itself varies
    return msgspec.structs.replace(
        settings,
        policies=[p for p in settings.policies if p != "harli/itl"],  # compared on the bursty levels
        loads=[1.0],
        duration_s=duration_s,
        trace="azure-code",
        trace_start_s=0.0,
        trace_span_s=600.0,
        oracle_probes=oracle_probes,
    )


def _simulate_estimate(settings: simulate.Settings) -> float:
    levels = 3.5 * len(settings.loads) * len(settings.seeds) * settings.duration_s / 90.0
    replays = 12.0 * len(settings.seeds) if settings.trace else 0.0  # measured: about 12 s a seed
    return levels + replays + 3.0


class Context(msgspec.Struct, kw_only=True):
    plan: Plan
    command: str
    seed: int
    out: Path
    plots: Path
    log_dir: Path


PartOutcome = tuple[str | None, list[str], list[report.Target], str, list[str]]
"""(raw JSON path, plot paths, targets, markdown table, notes)."""


def _write(path: Path, value) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(value), indent=1))
    return str(path)


def run_colocation(
    ctx: Context, log: Callable[[str], None], real: bool = False, trace: bool = False
) -> PartOutcome:
    from benchmark import plots

    plan = ctx.plan
    settings = {
        (False, False): plan.colocation,
        (True, False): plan.colocation_real,
        (False, True): plan.colocation_trace,
        (True, True): plan.colocation_trace_real,
    }[real, trace]
    suffix = ("_trace" if trace else "") + ("_smollm2" if real else "")
    result = colocation.run(settings, ctx.log_dir, log=log)
    raw = _write(ctx.out / f"colocation{suffix}.json", result)
    figures = [
        str(plots.colocation_tradeoff(result, ctx.plots / f"colocation_tradeoff{suffix}.png")),
        str(plots.colocation_timeline(result, ctx.plots / f"colocation_timeline{suffix}.png")),
    ]
    targets, table, notes = colocation.colocation_summary(result)
    return raw, figures, targets, table, notes


def run_overhead(ctx: Context, log: Callable[[str], None]) -> PartOutcome:
    from benchmark import plots

    result = overhead.run(ctx.plan.overhead, ctx.log_dir, log=log)
    raw = _write(ctx.out / "overhead.json", result)
    figures = [str(plots.overhead_runs(result, ctx.plots / "overhead.png"))]
    targets, table, notes = overhead.overhead_summary(result)
    return raw, figures, targets, table, notes


def run_train(ctx: Context, log: Callable[[str], None], real: bool = False) -> PartOutcome:
    from benchmark import plots, train_throughput

    suffix = "_smollm2" if real else ""
    raw = ctx.out / f"train_throughput{suffix}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    train_args = ctx.plan.train_real_args if real else ctx.plan.train_args
    command = [sys.executable, "-m", "benchmark.train_throughput", *train_args]
    command += ["--seed", str(ctx.seed), "--json", str(raw)]
    log(" ".join(command))
    subprocess.run(command, cwd=ROOT, check=True, timeout=max(600.0, 4 * ctx.plan.train_estimate_s))
    result = json.loads(raw.read_text())
    figures = [str(plots.train_throughput(result, ctx.plots / f"train_throughput{suffix}.png"))]
    targets, table, notes = train_throughput.train_summary(result)
    return str(raw), figures, targets, table, notes


def run_gpu(ctx: Context, log: Callable[[str], None]) -> PartOutcome:
    from benchmark.gpu.summary import gpu_summary

    gpu = report.machine().gpu
    log(f"GPU: {gpu}")
    if gpu == "none":
        targets, table, notes = gpu_summary(None, gpu)
        return None, [], targets, table, notes
    raw = ctx.out / "gpu.json"
    raw.unlink(missing_ok=True)  # a figure of an earlier run must not pass for this one's
    command = [sys.executable, "-m", "benchmark.gpu", *ctx.plan.gpu_args, "--seed", str(ctx.seed)]
    command += ["--out", str(ctx.out)]
    log(" ".join(command))
    # Its parts fail on their own and it exits 1 if any did; what the others measured is still recorded.
    subprocess.run(command, cwd=ROOT, check=False, timeout=max(900.0, 3 * ctx.plan.gpu_estimate_s))
    if not raw.exists():
        raise RuntimeError(f"benchmark.gpu wrote no {raw} (its output is above)")
    result = json.loads(raw.read_text())
    targets, table, notes = gpu_summary(result, gpu)
    return str(raw), [], targets, table, notes


def run_simulate(ctx: Context, log: Callable[[str], None]) -> PartOutcome:
    from benchmark import plots

    result = simulate.run(ctx.plan.simulate, log=log)
    raw = _write(ctx.out / "simulate.json", result)
    figures = [str(plots.simulate_gain(result, ctx.plots / "simulate_gain.png"))]
    targets, table, notes = simulate.simulate_summary(result)
    return raw, figures, targets, table, notes


RUNNERS: dict[str, Callable[[Context, Callable[[str], None]], PartOutcome]] = {
    "colocation": run_colocation,
    "colocation-smollm2": lambda ctx, log: run_colocation(ctx, log, real=True),
    "colocation-trace": lambda ctx, log: run_colocation(ctx, log, trace=True),
    "colocation-trace-smollm2": lambda ctx, log: run_colocation(ctx, log, real=True, trace=True),
    "overhead": run_overhead,
    "train": run_train,
    "train-smollm2": lambda ctx, log: run_train(ctx, log, real=True),
    "gpu": run_gpu,
    "simulate": run_simulate,
}


def run_part(name: str, ctx: Context, machine: report.Machine, estimate_s: float, log) -> report.PartRecord:
    started, started_utc = time.perf_counter(), report.now_utc()
    log(f"== {name} (estimated {estimate_s:.0f} s) ==")
    raw, figures, targets, table, notes, status = None, [], [], "", [], "ok"
    try:
        raw, figures, targets, table, notes = RUNNERS[name](ctx, log)
        if name == "gpu" and targets and targets[0].verdict.startswith("not run"):
            status = targets[0].verdict
    except Exception as exc:  # one broken part must not cost the others their figures
        traceback.print_exc()
        status = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
    seconds = time.perf_counter() - started
    log(f"== {name}: {status}, {seconds:.0f} s ==")
    return report.PartRecord(
        part=name,
        status=status,
        command=ctx.command,
        mode=ctx.plan.mode,
        seed=ctx.seed,
        started_utc=started_utc,
        seconds=seconds,
        estimated_s=estimate_s,
        machine=machine,
        result_json=_relative(raw),
        plots=[_relative(f) for f in figures],
        targets=targets,
        table=table,
        notes=notes,
    )


def _relative(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def merge(source: Path, out: Path) -> list[str]:
    """Record the parts of another run's ``run.json`` (a lent GPU's, fetched from its ``$OUT``) in
    ``<out>/run.json``, each still with the command, machine and date it ran with, its raw figures copied
    beside it; returns the parts merged."""
    other = report.load_manifest(source)
    if not other.parts:
        raise SystemExit(f"{source}: no part recorded there")
    path = out / "run.json"
    manifest = report.load_manifest(path)
    for name, part in other.parts.items():
        raw = source.parent / Path(part.result_json).name if part.result_json else None
        if raw is not None and raw.exists():
            target = out / raw.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw, target)
            part = msgspec.structs.replace(part, result_json=_relative(str(target)))
        manifest.parts[name] = part
    report.save_manifest(path, manifest)
    return list(other.parts)


def parse_parts(value: str | None) -> list[str]:
    if not value:
        return list(PARTS)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short suite (under 50 minutes on 2 cores)")
    parser.add_argument("--only", type=parse_parts, help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="raw JSON here, plots under <out>/plots"
    )
    parser.add_argument("--results-md", type=Path, default=DEFAULT_RESULTS_MD)
    parser.add_argument("--no-results-md", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/harli-benchmark"), help="server logs")
    parser.add_argument("--plan", action="store_true", help="print the time budget and exit")
    parser.add_argument(
        "--merge",
        type=Path,
        metavar="RUN_JSON",
        help="record the parts of another run's run.json (a lent GPU's) with their raw figures, and exit",
    )
    args = parser.parse_args(argv)
    if args.merge:
        names = merge(args.merge, args.out)
        if not args.no_results_md:
            manifest = report.load_manifest(args.out / "run.json")
            report.update_results_md(args.results_md, report.render(manifest, args.results_md))
        print(f"merged {', '.join(names)} from {args.merge} into {args.out / 'run.json'}")
        return 0
    parts = args.only or list(PARTS)
    plan = make_plan(args.quick, args.seed)
    estimates = plan.estimates()
    total = sum(estimates[p] for p in parts) + REPORT_S
    breakdown = ", ".join(f"{p} {estimates[p]:.0f} s" for p in parts)
    print(
        f"{plan.mode} run of {', '.join(parts)}: estimated {total / 60:.1f} min "
        f"({breakdown}, report {REPORT_S:.0f} s)"
    )
    if args.plan:
        return 0

    def log(line: str) -> None:
        print(line, flush=True)

    command = "python -m benchmark.run " + " ".join(sys.argv[1:] if argv is None else argv)
    ctx = Context(
        plan=plan,
        command=command.strip(),
        seed=args.seed,
        out=args.out,
        plots=args.out / "plots",
        log_dir=args.log_dir,
    )
    manifest_path = args.out / "run.json"
    manifest = report.load_manifest(manifest_path)
    machine = report.machine()
    log(f"machine: {machine.describe()}")
    started = time.perf_counter()
    for name in parts:
        manifest.parts[name] = run_part(name, ctx, machine, estimates[name], log)
        report.save_manifest(manifest_path, manifest)
        if not args.no_results_md:
            report.update_results_md(args.results_md, report.render(manifest, args.results_md))
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed / 60:.1f} min (estimated {total / 60:.1f}); records in {manifest_path}")
    failed = [n for n in parts if manifest.parts[n].status.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
