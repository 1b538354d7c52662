"""Time to a finished job on one instance vs two (``training.instances``), same decode load per instance.

Two Harli instances of one model form a fleet (``--harli-peers``), each started with one thread (two
torch processes on two cores). Both serve the same open-loop decode load throughout (a seeded bursty
trace, streamed). The same job runs twice, one after the other, alternating which goes first over the
repeats: on one instance (``placement`` the first) and data-parallel on both (local SGD, ``average_every``
steps between averages). Reported per run: seconds from submission to ``completed`` on every member, the
final adapter's mean next-token loss on the training texts (the server's own logprobs), each member's
contribution, and the decode requests' TPOT on each instance while the job ran.

    python -m benchmark.fleet                 # preset `tiny`, the figures in RESULTS.md
    python -m benchmark.fleet --model small   # slower, a larger model
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import requests

from benchmark.load import WORDS, bursty_trace, stream
from sglang_harli.models.builtin import PRESET_SCHEME
from sglang_harli.server_process import ServerProcess, free_port

KEY = "bench-fleet-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Run(msgspec.Struct, kw_only=True):
    instances: int
    repeat: int
    seconds: float
    """Submission to ``completed`` on every member."""
    steps: int
    """Optimizer steps each member trained."""
    loss: float
    """The final adapter's mean next-token loss on the training texts."""
    contributions: dict[str, dict] | None
    tpot_p50_ms: dict[str, float]
    """Per instance: decode requests' TPOT while the job ran (median)."""
    tpot_p99_ms: dict[str, float]


class Report(msgspec.Struct, kw_only=True):
    model: str
    rate: float
    epochs: int
    average_every: int
    runs: list[Run]
    speedup: float
    """Median one-instance time over median two-instance time."""
    loss_ratio: float
    """Median two-instance loss over median one-instance loss."""


def texts(seed: int, count: int = 32) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(12, 28))) for _ in range(count)]


class Load:
    """The bursty decode load, streamed open loop to one instance until stopped; keeps each request's TPOT."""

    def __init__(self, url: str, seed: int, rate: float):
        self.url, self.stop = url, threading.Event()
        self.trace = bursty_trace(seed, 3600.0, burst_rate=rate * 2.5, quiet_rate=rate / 2)
        self.tpots: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.perf_counter()

        def one(arrival) -> None:
            result = stream(self.url, arrival)
            if result.gaps_s and not self.stop.is_set():
                self.tpots.append(sum(result.gaps_s) / len(result.gaps_s))

        with ThreadPoolExecutor(max_workers=32) as pool:
            for arrival in self.trace:
                while (delay := arrival.at_s - (time.perf_counter() - start)) > 0 and not self.stop.is_set():
                    time.sleep(min(delay, 0.1))
                if self.stop.is_set():
                    return
                pool.submit(one, arrival)


def job(name: str, records: list[str], *, epochs: int, instances: int, every: int, placement: str) -> dict:
    spec = {
        "name": name,
        "dataset": {"records": [{"text": text} for text in records]},
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {
            "epochs": epochs, "learning_rate": 0.005, "micro_batch_size": 4, "max_seq_len": 64,
            "instances": instances, "average_every": every,
        },
    }  # fmt: skip
    if instances == 1:
        spec["placement"] = placement
    return spec


def training_loss(url: str, adapter: str, records: list[str]) -> float:
    body = {
        "text": records, "lora_path": [adapter] * len(records), "return_logprob": True,
        "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
    }  # fmt: skip
    resp = requests.post(f"{url}/generate", json=body, headers=AUTH, timeout=300)
    resp.raise_for_status()
    logprobs = [lp for out in resp.json() for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    return -sum(logprobs) / len(logprobs)


def run_job(a: ServerProcess, b: ServerProcess, spec: dict, repeat: int, seed: int, rate: float) -> Run:
    name, records = spec["name"], [r["text"] for r in spec["dataset"]["records"]]
    with Load(a.url, seed, rate) as load_a, Load(b.url, seed + 1, rate) as load_b:
        started = time.perf_counter()
        resp = requests.post(f"{a.url}/harli/jobs", json=spec, headers=AUTH, timeout=120)
        assert resp.status_code == 201, resp.text
        while True:
            entries = [j for j in a.get("/harli/jobs").json() if j["name"] == name]
            if entries and all(j["state"] in ("completed", "failed", "cancelled") for j in entries):
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - started
    assert all(j["state"] == "completed" for j in entries), entries
    loads = {a.url: load_a.tpots, b.url: load_b.tpots}
    group = entries[0].get("group")
    return Run(
        instances=spec["training"]["instances"],
        repeat=repeat,
        seconds=seconds,
        steps=entries[0]["step"],
        loss=training_loss(a.url, name, records),
        contributions=group["contributions"] if group else None,
        tpot_p50_ms={
            url: float(np.percentile(t, 50)) * 1e3 if t else float("nan") for url, t in loads.items()
        },
        tpot_p99_ms={
            url: float(np.percentile(t, 99)) * 1e3 if t else float("nan") for url, t in loads.items()
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="built-in preset (default: tiny)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean decode requests/s per instance")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--average-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/fleet.json"))
    parser.add_argument("--log-dir", type=Path, default=Path("benchmark/results/fleet-logs"))
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    flags = [
        "--model-path", f"{PRESET_SCHEME}{args.model}", "--enable-lora", "--max-lora-rank", "16",
        "--lora-target-modules", "all", "--admin-api-key", KEY,
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    a = ServerProcess([*flags, "--harli-peers", url_b], args.log_dir / "a.log", port=port_a, env=env)
    b = ServerProcess([*flags, "--harli-peers", url_a], args.log_dir / "b.log", port=port_b, env=env)
    records = texts(0)
    runs: list[Run] = []
    with a, b:
        while not all(p["alive"] for s in (a, b) for p in s.get("/harli/stats").json()["fleet"]["peers"]):
            time.sleep(0.5)
        for repeat in range(args.repeats):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            for instances in order:
                name = f"fleet-{instances}x-{repeat}"
                spec = job(name, records, epochs=args.epochs, instances=instances, every=args.average_every,
                           placement=a.url)  # fmt: skip
                spec["name"] = name
                run = run_job(a, b, spec, repeat, seed=100 + repeat, rate=args.rate)
                runs.append(run)
                print(json.dumps(msgspec.to_builtins(run)), flush=True)
    one = [r for r in runs if r.instances == 1]
    two = [r for r in runs if r.instances == 2]
    report = Report(
        model=args.model,
        rate=args.rate,
        epochs=args.epochs,
        average_every=args.average_every,
        runs=runs,
        speedup=statistics.median(r.seconds for r in one) / statistics.median(r.seconds for r in two),
        loss_ratio=statistics.median(r.loss for r in two) / statistics.median(r.loss for r in one),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    header = f"{'instances':>9} {'repeat':>6} {'seconds':>8} {'steps':>5} {'loss':>7}"
    print(f"\n{header}  TPOT p50/p99 ms per instance")
    for r in runs:
        tpot = "  ".join(f"{r.tpot_p50_ms[u]:.0f}/{r.tpot_p99_ms[u]:.0f}" for u in r.tpot_p50_ms)
        print(f"{r.instances:>9} {r.repeat:>6} {r.seconds:>8.1f} {r.steps:>5} {r.loss:>7.4f}  {tpot}")
    print(f"\ntime to a finished job, 1 instance / 2 instances: {report.speedup:.2f}x")
    print(f"final training loss, 2 instances / 1 instance: {report.loss_ratio:.3f}")


if __name__ == "__main__":
    main()
