"""Trace-driven simulation of one decode instance co-running LoRA finetuning. SIMULATED, not measured.

The paper's claim (finetune throughput +46.2% on average, up to +92%, over the baselines at equal decode
QoS) is about a LLaMA3-8B-class model decoding on an H100; a 2-core CPU cannot reach that regime. This
package replays seeded bursty request traces (and a real one, the Azure LLM inference trace 2023,
``benchmark.traces``) against a model of such an instance and drives, step by
step, the very objects the server runs: ``core.colocation.qos.make_policy`` (``harli`` and the ``idle-only``,
``naive`` and ``static`` baselines), ``core.colocation.predictor.LatencyPredictor`` (fed only with the
simulated observations), ``core.colocation.loop.CoLocation`` (the loop glue the scheduler uses, built by the
same ``CoLocation.from_config``, here on the simulated clock) and the SM split menu
``core.colocation.partition.plan_splits`` builds on an H100. Only latencies are modelled; every decision is
the production code's.

- ``model``: the modelled GPU, model shape, finetune job and assumptions, and ``Roofline``, the latency
  of a decode step or a finetune unit on them (constants and their sources are listed there);
- ``workload``: request shapes and seeded bursty arrivals (``Workload``, ``Request``), and a real trace
  (``benchmark.traces``) clipped to the same shapes (``recorded``, ``requests``);
- ``loop``: the decode instance on a simulated clock (``Instance``, ``SimTrainer``) and ``simulate()``,
  one policy on one trace;
- ``evaluate``: the experiment (``Settings``, ``QUICK``/``FULL``, ``best_static``, ``evaluate_load``,
  ``evaluate_trace``, ``run`` and its ``Report``), with the gain's definition;
- ``summary``: the part's targets, tables and notes in ``RESULTS.md`` (``simulate_summary``);
- ``__main__``: the command line.

    python -m benchmark.simulate --quick        # seconds
    python -m benchmark.simulate --json benchmark/results/simulate.json
    python -m benchmark.simulate --quick --trace-only   # only the real trace (Azure code, 2023)
"""

from benchmark.simulate.evaluate import (
    FULL,
    ORACLE,
    PAPER_AVERAGE_GAIN,
    PAPER_MAX_GAIN,
    QUICK,
    REALISTIC,
    LoadResult,
    Report,
    Settings,
    TraceResult,
    TraceTuning,
    best_static,
    describe_load,
    describe_trace,
    evaluate_load,
    evaluate_trace,
    gains_by_load,
    run,
)
from benchmark.simulate.loop import Instance, RunResult, SimTrainer, simulate
from benchmark.simulate.model import Assumptions, FinetuneSetup, Gpu, ModelShape, Roofline
from benchmark.simulate.summary import simulate_summary
from benchmark.simulate.workload import Request, Workload
from benchmark.verdicts import ATTAINMENT_TARGET, BASELINES

__all__ = [
    "ATTAINMENT_TARGET",
    "BASELINES",
    "FULL",
    "ORACLE",
    "PAPER_AVERAGE_GAIN",
    "PAPER_MAX_GAIN",
    "QUICK",
    "REALISTIC",
    "Assumptions",
    "FinetuneSetup",
    "Gpu",
    "Instance",
    "LoadResult",
    "ModelShape",
    "Report",
    "Request",
    "Roofline",
    "RunResult",
    "Settings",
    "SimTrainer",
    "TraceResult",
    "TraceTuning",
    "Workload",
    "best_static",
    "describe_load",
    "describe_trace",
    "evaluate_load",
    "evaluate_trace",
    "gains_by_load",
    "run",
    "simulate",
    "simulate_summary",
]
