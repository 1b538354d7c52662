"""Every latency a streaming user sees, side by side: vanilla SGLang, Harli as it was, Harli's defaults.

SGLang's own client (``python -m sglang.bench_serving``, random token ids, so nothing is downloaded) against
the real preset (``harli:smollm2-135m``), in one run: vanilla ``sglang.launch_server`` first (its TPOT p99
sets the SLO: ``--slo-factor`` times it), then two Harli servers with the same LoRA flags and a long job
training while the requests stream:

- ``previous``: what ``--harli-slo-metric tpot`` did before the TTFT objective and the interval cap's
  default (``--harli-max-itl-ms 0``, and ``--harli-ttft-slo-ms`` so large that every prefill that arrives
  during finetune work beside decode is held one decode step, as every one was);
- ``defaults``: the flags a user gets (the interval cap at twice the SLO; no prefill held for finetune
  work; room left in each interval for the prefills the arrival rate says will come).

Reported per server: TTFT p50/p99, ITL p99 and TPOT p99 as ``bench_serving`` prints them, and the job's
finetune tokens/s over the client's run. The targets (issue 32): with defaults, TTFT p99 at most 1.5x
vanilla's, ITL p99 at most 2x the SLO, TPOT p99 within the SLO, and finetune tokens/s at least 0.8x
``previous``'s.

    python -m benchmark.latency                    # about 4 minutes on a 2-core CPU
    python -m benchmark.latency --requests 60 --rate 1.5 --json benchmark/results/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import psutil

from sglang_harli.models.builtin import materialize
from sglang_harli.server_process import ServerProcess

MODEL = "smollm2-135m"
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all"]
FACTS = [
    f"The code word for item {i} is {word}." for i, word in enumerate("amber basil cedar delta ember".split())
]


class Row(msgspec.Struct, kw_only=True):
    server: str
    flags: list[str]
    completed: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p99_ms: float
    tpot_p99_ms: float
    finetune_tokens_per_s: float | None = None
    server_ttft_p99_ms: float | None = None
    """TTFT p99 as the server measured it (arrival at the scheduler to first token)."""
    held_prefills: int | None = None


def job() -> dict:
    records = [{"text": f"{fact} {fact}"} for fact in FACTS * 6]
    return {
        "name": "latency",
        "dataset": {"records": records},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]},
        "training": {"epochs": 1000, "learning_rate": 1e-4, "micro_batch_size": 4, "max_seq_len": 96},
    }


def bench(server: ServerProcess, model_dir: Path, args, out: Path) -> dict:
    command = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", server.url,
        "--tokenizer", str(model_dir), "--dataset-name", "random-ids",
        "--num-prompts", str(args.requests), "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "1.0",
        "--request-rate", str(args.rate), "--seed", str(args.seed), "--output-file", str(out),
        "--disable-tqdm",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return json.loads(out.read_text().splitlines()[-1])


def run_server(name: str, flags: list[str], model_dir: Path, args, work: Path, *, vanilla=False) -> Row:
    module = "sglang.launch_server" if vanilla else "sglang_harli.launch_server"
    full = ["--model-path", str(model_dir), *LORA_FLAGS, *flags]
    if vanilla:  # what the Harli launcher adds by itself on a CPU machine (benchmark.overhead)
        full += ["--device", "cpu", "--dtype", "float32", "--sleep-on-idle", "--lora-backend", "torch_native"]
    with ServerProcess(full, work / f"{name}.log", module=module) as server:
        tokens_before = started = None
        if not vanilla:
            resp = server.post("/harli/jobs", job())
            if resp.status_code != 201:
                raise RuntimeError(resp.text)
            while server.get("/harli/jobs/latency").json()["step"] < 2:
                time.sleep(0.2)
            tokens_before, started = (
                server.get("/harli/jobs/latency").json()["tokens_trained"],
                time.monotonic(),
            )
        result = bench(server, model_dir, args, work / f"{name}.jsonl")
        row = Row(
            server=name,
            flags=flags,
            completed=result["completed"],
            ttft_p50_ms=result["median_ttft_ms"],
            ttft_p99_ms=result["p99_ttft_ms"],
            itl_p99_ms=result["p99_itl_ms"],
            tpot_p99_ms=result["p99_tpot_ms"],
        )
        if not vanilla:
            tokens = server.get("/harli/jobs/latency").json()["tokens_trained"] - tokens_before
            row.finetune_tokens_per_s = tokens / (time.monotonic() - started)
            prefill = server.get("/harli/stats").json()["colocation"]["prefill"]
            row.server_ttft_p99_ms, row.held_prefills = prefill["ttft"]["p99_ms"], prefill["held"]
    return row


def targets(rows: dict[str, Row], slo_ms: float) -> list[tuple[str, str, bool]]:
    vanilla, previous, defaults = rows["vanilla"], rows["previous"], rows["defaults"]
    ratio = (
        defaults.finetune_tokens_per_s / previous.finetune_tokens_per_s
        if previous.finetune_tokens_per_s
        else 0
    )
    return [
        (f"TTFT p99 <= 1.5x vanilla ({1.5 * vanilla.ttft_p99_ms:.0f} ms)", f"{defaults.ttft_p99_ms:.0f} ms",
         defaults.ttft_p99_ms <= 1.5 * vanilla.ttft_p99_ms),
        (f"ITL p99 <= 2x the SLO ({2 * slo_ms:.0f} ms)", f"{defaults.itl_p99_ms:.0f} ms",
         defaults.itl_p99_ms <= 2 * slo_ms),
        (f"TPOT p99 <= the SLO ({slo_ms:.0f} ms)", f"{defaults.tpot_p99_ms:.0f} ms",
         defaults.tpot_p99_ms <= slo_ms),
        ("finetune tokens/s >= 0.8x previous", f"{ratio:.2f}x", ratio >= 0.8),
    ]  # fmt: skip


def table(rows: dict[str, Row], slo_ms: float) -> str:
    lines = [
        "| server | TTFT p50 | TTFT p99 | ITL p99 | TPOT p99 | finetune tok/s | held prefills |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows.values():
        rate = "-" if row.finetune_tokens_per_s is None else f"{row.finetune_tokens_per_s:.0f}"
        held = "-" if row.held_prefills is None else str(row.held_prefills)
        lines.append(
            f"| {row.server} | {row.ttft_p50_ms:.0f} ms | {row.ttft_p99_ms:.0f} ms | {row.itl_p99_ms:.0f} ms "
            f"| {row.tpot_p99_ms:.0f} ms | {rate} | {held} |"
        )
    lines += ["", "| target (defaults) | measured | verdict |", "| --- | --- | --- |"]
    for target, measured, met in targets(rows, slo_ms):
        lines.append(f"| {target} | {measured} | {'met' if met else '**missed**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--input-len", type=int, default=96)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--slo-factor", type=float, default=2.0, help="SLO = this x vanilla's TPOT p99")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model_dir = materialize(MODEL)
    work = Path(tempfile.mkdtemp(prefix="harli-latency-"))
    rows = {"vanilla": run_server("vanilla", [], model_dir, args, work, vanilla=True)}
    slo_ms = round(args.slo_factor * rows["vanilla"].tpot_p99_ms)
    slo = ["--harli-tpot-slo-ms", str(slo_ms)]
    previous = [*slo, "--harli-max-itl-ms", "0", "--harli-ttft-slo-ms", "1e9"]
    rows["previous"] = run_server("previous", previous, model_dir, args, work)
    rows["defaults"] = run_server("defaults", slo, model_dir, args, work)
    memory = psutil.virtual_memory().total / 2**30
    command = "python -m benchmark.latency " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command.strip()}  ({platform.machine()}, {psutil.cpu_count()} cores, {memory:.0f} GiB)")
    print(f"SLO {slo_ms} ms ({args.slo_factor:g}x vanilla's TPOT p99); logs in {work}\n")
    print(table(rows, slo_ms))
    if args.json:
        record = {
            "command": command.strip(),
            "slo_ms": slo_ms,
            "rows": [msgspec.to_builtins(r) for r in rows.values()],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
