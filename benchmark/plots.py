"""PNG figures for ``benchmark.run``, drawn from the results' own records (matplotlib, Agg backend).

Each function takes a benchmark's report struct and a path and writes one figure meant to be read at a
glance: what was compared, on which axis the claim lives, and where the target line is.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmark import colocation, overhead, simulate, verdicts  # noqa: E402

POLICY_STYLE = {
    "harli": ("tab:red", "o"),
    "harli/shared": ("tab:pink", "v"),
    "harli/itl": ("tab:orange", "P"),
    "static": ("tab:blue", "s"),
    "static/peak": ("tab:blue", "s"),
    "static/oracle": ("tab:cyan", "D"),
    "idle-only": ("tab:green", "^"),
    "naive": ("tab:gray", "x"),
}
DPI = 110


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def colocation_tradeoff(report: colocation.Report, path: Path) -> Path:
    """Per policy, finetune throughput against SLO attainment, one point per load level."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(r.policy for r in report.levels):
        rows = sorted((r for r in report.levels if r.policy == policy), key=lambda r: r.load)
        if not rows:
            continue
        color, marker = POLICY_STYLE.get(policy, ("black", "o"))
        xs = [r.slo_attainment for r in rows]
        ys = [r.finetune_tokens_per_s for r in rows]
        ax.plot(xs, ys, marker=marker, color=color, label=policy)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"x{r.load:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(verdicts.ATTAINMENT_TARGET, color="black", linestyle="--", linewidth=1)
    ax.text(verdicts.ATTAINMENT_TARGET, ax.get_ylim()[1], " SLO held (p99)", va="top", fontsize=8)
    ax.set_xlabel(f"SLO attainment (share of token intervals <= {report.settings.slo_ms:g} ms)")
    ax.set_ylabel("finetune tokens/s")
    ax.set_title("Co-location on CPU (real server): throughput vs QoS, labels = load multiplier")
    ax.legend()
    return _save(fig, path)


def colocation_timeline(report: colocation.Report, path: Path, policy: str = "harli") -> Path:
    """One policy's levels back to back: batch, token interval vs SLO, admitted units, lent memory."""
    timelines = sorted((t for t in report.timelines if t.policy == policy), key=lambda t: t.load)
    fig, axes = plt.subplots(4, 1, figsize=(10, 8.5), sharex=True)
    offset = 0.0
    slo = report.settings.slo_ms
    for timeline in timelines:
        steps = timeline.steps
        t = np.array([s.t_s for s in steps]) + offset
        if steps:
            axes[0].step(t, [s.batch_size for s in steps], where="post", color="tab:blue", linewidth=0.8)
            axes[1].plot(t, [s.observed_ms for s in steps], ".", markersize=2, color="tab:blue")
            predicted = [(x, s.predicted_ms) for x, s in zip(t, steps, strict=True) if s.predicted_ms]
            if predicted:
                px, py = zip(*predicted, strict=True)
                axes[1].plot(px, py, ".", markersize=2, color="tab:orange")
            axes[2].vlines(t, 0, [s.units for s in steps], color="tab:red", linewidth=0.6)
        polls = timeline.polls
        pt = np.array([p.t_s for p in polls]) + offset
        budget = [(x, slo - p.margin_ms) for x, p in zip(pt, polls, strict=True) if p.margin_ms is not None]
        if budget:
            bx, by = zip(*budget, strict=True)
            axes[1].step(bx, by, where="post", color="tab:green", linewidth=1)
        axes[3].step(pt, [p.lent_mib for p in polls], where="post", color="tab:purple")
        for ax in axes:
            ax.axvline(offset, color="gray", linewidth=0.5)
        axes[0].text(
            offset,
            0.02,
            f" load x{timeline.load:g}",
            fontsize=8,
            va="bottom",
            transform=axes[0].get_xaxis_transform(),
        )
        offset = float(max([offset, *t, *pt])) + 1.0
    axes[1].axhline(slo, color="black", linestyle="--", linewidth=1)
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("decode batch")
    axes[1].set_ylabel("token interval ms")
    axes[1].legend(
        handles=[
            plt.Line2D([], [], color="tab:blue", marker=".", linestyle="", label="observed"),
            plt.Line2D([], [], color="tab:orange", marker=".", linestyle="", label="predicted"),
            plt.Line2D([], [], color="tab:green", label="budget (SLO - margin)"),
            plt.Line2D([], [], color="black", linestyle="--", label="SLO"),
        ],
        fontsize=7,
        loc="upper right",
    )
    axes[2].set_ylabel("units admitted")
    axes[3].set_ylim(bottom=0)
    axes[3].set_ylabel("KV lent MiB")
    axes[3].set_xlabel("seconds (load levels back to back)")
    axes[0].set_title(f"{policy} on the real CPU server: decode, QoS budget and finetune work over time")
    return _save(fig, path)


def overhead_runs(report: overhead.Report, path: Path) -> Path:
    """Every run in order (A B B A ...): client TPOT p50 and closed-loop throughput, by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    colors = {"vanilla": "tab:gray", "harli": "tab:red"}
    labels = [f"{r.index}:{r.side}" for r in report.runs]
    left.bar(labels, [r.tpot_p50_ms for r in report.runs], color=[colors[r.side] for r in report.runs])
    left.set_ylabel("TPOT p50 ms (client)")
    right.bar(
        labels, [r.output_tokens_per_s for r in report.runs], color=[colors[r.side] for r in report.runs]
    )
    right.set_ylabel("output tokens/s (full batch)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(
        f"Overhead: harli/vanilla TPOT x{report.median_tpot_ratio:.3f}, throughput "
        f"x{report.median_throughput_ratio:.3f} (median over pairs; target <= 2% slower)"
    )
    return _save(fig, path)


def train_throughput(result: dict, path: Path) -> Path:
    """Per repeat, our trainer's tokens/s beside the plain transformers + PEFT loop's."""
    repeats = result["repeats"]
    x = np.arange(len(repeats))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(x - 0.2, [r["ours_tokens_per_s"] for r in repeats], 0.4, label="LoraTrainer", color="tab:red")
    ax.bar(
        x + 0.2,
        [r["reference_tokens_per_s"] for r in repeats],
        0.4,
        label="transformers + PEFT",
        color="gray",
    )
    ax.set_xticks(x, [f"repeat {r['repeat']} ({r['first']} first)" for r in repeats], fontsize=8)
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"Trainer, {result['model']} {result['dtype']}: median ratio {result['median_ratio']:.3f}")
    ax.legend()
    return _save(fig, path)


def simulate_gain(report: simulate.Report, path: Path) -> Path:
    """SIMULATED: harli's gain per load level next to the paper's average, with what it is made of."""
    fig, (gain_ax, rate_ax, att_ax) = plt.subplots(1, 3, figsize=(14, 4.2))
    by_load = simulate.gains_by_load(report)
    for load, gains in by_load.items():
        gain_ax.plot([load] * len(gains), [100 * g for g in gains], ".", color="tab:red", alpha=0.5)
    if by_load:
        gain_ax.plot(
            list(by_load),
            [100 * float(np.mean(g)) for g in by_load.values()],
            "-o",
            color="tab:red",
            label="harli",
        )
    gain_ax.axhline(100 * simulate.PAPER_AVERAGE_GAIN, color="black", linestyle="--", label="paper average")
    gain_ax.axhline(0, color="gray", linewidth=0.5)
    gain_ax.set_xlabel("load (fraction of saturation arrival rate)")
    gain_ax.set_ylabel("finetune throughput gain, %")
    gain_ax.set_title("SIMULATED gain over the best SLO-holding baseline", fontsize=10)
    gain_ax.legend(fontsize=8)
    policies = [p for p in POLICY_STYLE if any(r.policy == p for lr in report.loads for r in lr.runs)]
    for policy in policies:
        color, marker = POLICY_STYLE[policy]
        loads = sorted({lr.load for lr in report.loads})
        rates, atts = [], []
        for load in loads:
            runs = [r for lr in report.loads if lr.load == load for r in lr.runs if r.policy == policy]
            rates.append(np.mean([r.finetune_tokens_per_s for r in runs]))
            atts.append(np.mean([r.slo_attainment for r in runs]))
        rate_ax.plot(loads, rates, marker=marker, color=color, label=policy)
        att_ax.plot(loads, atts, marker=marker, color=color, label=policy)
    rate_ax.set_xlabel("load")
    rate_ax.set_ylabel("finetune tokens/s")
    rate_ax.set_title(f"SIMULATED {report.gpu.name}, LLaMA3-8B shape", fontsize=10)
    rate_ax.legend(fontsize=8)
    att_ax.axhline(verdicts.ATTAINMENT_TARGET, color="black", linestyle="--", linewidth=1)
    att_ax.set_xlabel("load")
    att_ax.set_ylabel(f"SLO attainment (TPOT <= {report.settings.slo_ms:g} ms)")
    att_ax.set_ylim(max(0.0, min(0.9, att_ax.get_ylim()[0])), 1.002)
    att_ax.set_title("SIMULATED decode QoS", fontsize=10)
    return _save(fig, path)
