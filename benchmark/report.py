"""The generated part of ``RESULTS.md``: every figure of ``benchmark.run`` with its verdicts.

Each part's record (``PartRecord``) carries what a reader needs to trust or redo a figure: the command,
the machine, the seed, when it ran and for how long, and per target "met" or "missed" beside the value
measured. Records live in ``results/run.json`` and are merged across runs, so ``--only simulate`` updates
the simulation and leaves the co-location figures of an earlier run in place, each still dated and
attributed. The section is rewritten between two markers; everything else in ``RESULTS.md`` is left as
written by hand.

Each benchmark owns its summary (its targets, table and notes, from its own result):
``colocation.colocation_summary``, ``overhead.overhead_summary``, ``train_throughput.train_summary``,
``gpu.summary.gpu_summary`` and ``simulate.simulate_summary``, written with ``Target``, ``verdict`` and the
markdown helpers here. This module keeps the manifest and the rendering, and imports no benchmark.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from importlib import metadata
from pathlib import Path

import msgspec

BEGIN = "<!-- benchmark.run:begin -->"
END = "<!-- benchmark.run:end -->"
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


# -- shared by the benchmarks' summaries ------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


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
