"""Co-location on CPU: every ``--harli-policy`` on the same seeded bursty decode trace, side by side.

Each policy gets a fresh server (built-in ``small`` model, LoRA on) with a long finetune job running,
and the same open-loop trace of streaming ``/generate`` requests: bursts of arrivals, then quiet. The
client measures every request's time per output token from the streamed chunks themselves (not server
counters). Finetune throughput is the job's trained tokens over the trace, read from its status.

The slack ceiling is what a perfect scheduler could train in the same run: the finetune-alone rate
(measured in the ``harli`` server before the trace, with no decode) times the fraction of the trace's
wall time not spent in forward passes (``forward_s`` from ``/harli/stats``). The ``static`` baseline is
tuned from the ``harli`` run's own measurements so the SLO holds at peak: as many units per step as fit
between the p99 decode step and the SLO at the p99 unit time.

    python -m benchmark.colocation                       # figures in RESULTS.md (about 8 minutes)
    python -m benchmark.colocation --duration 20 --policies harli idle-only   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import requests

from sglang_harli.models.builtin import PRESET_SCHEME
from sglang_harli.server_process import ServerProcess

POLICIES = ("harli", "static", "idle-only", "naive")
ATTAINMENT_TARGET = 0.99
"""A policy "holds the SLO" when this share of client-side token intervals is within it (p99)."""
WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lumen maple nectar onyx".split()
)


class Arrival(msgspec.Struct, array_like=True):
    at_s: float
    prompt: str
    max_new_tokens: int


class RequestResult(msgspec.Struct, kw_only=True):
    ok: bool
    tokens: int
    gaps_s: list[float]
    error: str | None = None


class PolicyResult(msgspec.Struct, kw_only=True):
    policy: str
    requests: int
    failed: int
    tpot_p50_ms: float
    tpot_p99_ms: float
    slo_attainment: float
    finetune_tokens_per_s: float
    finetune_tokens: int
    trace_s: float
    forward_fraction: float
    predictor_solo_mape: float | None
    predictor_corun_mape: float | None
    admitted_units: int
    margin_ms: float | None
    server_tpot_p99_ms: float | None
    """The same intervals as the server saw them (decode result to decode result), for comparison."""
    server_slo_attainment: float | None
    static_units: int | None = None


def bursty_trace(
    seed: int, duration_s: float, *, burst_rate: float, quiet_rate: float, period_s: float = 12.0
):
    """Poisson arrivals whose rate switches between a burst (first third of each period) and quiet."""
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    while True:
        in_burst = (now % period_s) < period_s / 3
        now += rng.expovariate(burst_rate if in_burst else quiet_rate)
        if now >= duration_s:
            return arrivals
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
        arrivals.append(Arrival(at_s=now, prompt=prompt, max_new_tokens=rng.randint(24, 96)))


def stream(url: str, arrival: Arrival) -> RequestResult:
    body = {
        "text": arrival.prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": arrival.max_new_tokens, "temperature": 0, "ignore_eos": True},
    }
    gaps, last, tokens = [], None, 0
    try:
        with requests.post(f"{url}/generate", json=body, stream=True, timeout=300) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, tokens=0, gaps_s=[], error=f"HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[5:])
                new = len(chunk["output_ids"]) if "output_ids" in chunk else 1
                if last is not None and new > tokens:
                    # a chunk carrying k new tokens stands for k token intervals of equal share
                    gaps.extend([(now - last) / (new - tokens)] * (new - tokens))
                last, tokens = now, new
    except requests.RequestException as exc:
        return RequestResult(ok=False, tokens=tokens, gaps_s=gaps, error=str(exc))
    return RequestResult(ok=tokens == arrival.max_new_tokens, tokens=tokens, gaps_s=gaps)


def replay(url: str, trace: list[Arrival]) -> list[RequestResult]:
    results: list[RequestResult | None] = [None] * len(trace)
    start = time.perf_counter()

    def run(index: int) -> None:
        results[index] = stream(url, trace[index])

    with ThreadPoolExecutor(max_workers=64) as pool:
        for index, arrival in enumerate(trace):
            delay = arrival.at_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            pool.submit(run, index)
    return results  # type: ignore[return-value]


def job_spec(seed: int) -> dict:
    rng = random.Random(seed)
    records = [
        {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(16, 48))),
            "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(16, 48))),
        }
        for _ in range(64)
    ]
    return {
        "name": "bench",
        "dataset": {"records": records},
        "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {"epochs": 1000, "micro_batch_size": 2, "max_seq_len": 128, "seed": seed},
    }


def job_tokens(server: ServerProcess) -> int:
    return int(server.get("/harli/jobs/bench").json()["tokens_trained"])


def run_policy(policy: str, args, trace: list[Arrival], log_dir: Path, *, static_units: int | None = None):
    flags = [
        "--model-path", f"{PRESET_SCHEME}{args.model}",
        "--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all",
        "--harli-policy", policy, "--harli-tpot-slo-ms", str(args.slo_ms),
    ]  # fmt: skip
    if static_units is not None:
        flags += ["--harli-static-units", str(static_units)]
    extra: dict = {}
    with ServerProcess(flags, log_dir / f"{policy}.log") as server:
        resp = server.post("/harli/jobs", job_spec(args.seed))
        assert resp.status_code == 201, resp.text
        while server.get("/harli/jobs/bench").json()["step"] < 1:
            time.sleep(0.2)
        if policy == "harli":  # finetune alone: the job with no decode at all
            tokens, started = job_tokens(server), time.perf_counter()
            time.sleep(args.alone_s)
            extra["alone_tokens_per_s"] = (job_tokens(server) - tokens) / (time.perf_counter() - started)
        # warm the decode path (and stage 1 of the predictor) outside the measured window
        replay(
            server.url,
            bursty_trace(args.seed + 1, 4.0, burst_rate=args.burst_rate, quiet_rate=args.burst_rate),
        )
        time.sleep(1.0)
        before_stats, tokens, started = (
            server.get("/harli/stats").json(),
            job_tokens(server),
            time.perf_counter(),
        )
        results = replay(server.url, trace)
        trace_s = time.perf_counter() - started
        trained = job_tokens(server) - tokens
        stats = server.get("/harli/stats").json()
        server.post("/harli/jobs/bench/cancel", {})
    gaps = np.array([g for r in results for g in r.gaps_s]) * 1e3
    colocation = stats["colocation"]
    predictor = colocation["predictor"]
    corun = predictor["corun"].get("shared") or {}
    result = PolicyResult(
        policy=policy,
        requests=len(results),
        failed=sum(not r.ok for r in results),
        tpot_p50_ms=float(np.percentile(gaps, 50)),
        tpot_p99_ms=float(np.percentile(gaps, 99)),
        slo_attainment=float(np.mean(gaps <= args.slo_ms)),
        finetune_tokens_per_s=trained / trace_s,
        finetune_tokens=trained,
        trace_s=trace_s,
        forward_fraction=(stats["forward_s"] - before_stats["forward_s"]) / trace_s,
        predictor_solo_mape=predictor["solo"]["mape_overall"],
        predictor_corun_mape=corun.get("mape_overall"),
        admitted_units=colocation["policy"]["admitted_units"],
        margin_ms=colocation["policy"]["margin_ms"],
        server_tpot_p99_ms=colocation["token_intervals"]["p99_ms"],
        server_slo_attainment=colocation["token_intervals"]["slo_attainment"],
        static_units=static_units,
    )
    extra["decode_step_p99_ms"] = stats["decode_step_latency"]["p99_ms"]
    extra["unit_p99_ms"] = colocation["unit_ms"]["p99"]
    extra["decision_us"] = colocation["decision_us"]
    return result, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--slo-ms", type=float, default=250.0)
    parser.add_argument("--duration", type=float, default=60.0, help="trace length in seconds")
    parser.add_argument("--burst-rate", type=float, default=1.5, help="arrivals/s during bursts")
    parser.add_argument("--quiet-rate", type=float, default=0.2, help="arrivals/s between bursts")
    parser.add_argument("--alone-s", type=float, default=10.0, help="finetune-alone measurement, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/harli-colocation"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)

    trace = bursty_trace(args.seed, args.duration, burst_rate=args.burst_rate, quiet_rate=args.quiet_rate)
    print(
        f"{platform.processor() or platform.machine()}, {len(trace)} requests over {args.duration:.0f} s "
        f"(bursts {args.burst_rate}/s, quiet {args.quiet_rate}/s, seed {args.seed}), SLO {args.slo_ms} ms",
        flush=True,
    )
    results: dict[str, PolicyResult] = {}
    measured: dict = {}
    order = [p for p in POLICIES if p in args.policies]
    for policy in order:
        static_units = None
        if policy == "static":
            if "harli" in measured:  # tuned so the SLO holds at peak, from the harli run's own figures
                slack = 0.9 * args.slo_ms - measured["harli"]["decode_step_p99_ms"]
                static_units = max(1, math.floor(slack / measured["harli"]["unit_p99_ms"]))
            else:
                static_units = 2
        result, extra = run_policy(policy, args, trace, args.log_dir, static_units=static_units)
        results[policy], measured[policy] = result, extra
        print(json.dumps(msgspec.to_builtins(result)), flush=True)

    alone = measured.get("harli", {}).get("alone_tokens_per_s")
    print(f"\nfinetune alone: {alone:.0f} tokens/s" if alone else "")
    header = "policy      req  fail  TPOT p50  TPOT p99  SLO att.  finetune tok/s  vs best baseline"
    print(header + "\n" + "-" * len(header))
    holding = [r for r in results.values() if r.policy != "harli" and r.slo_attainment >= ATTAINMENT_TARGET]
    best = max((r.finetune_tokens_per_s for r in holding), default=None)
    for r in results.values():
        ratio = f"{r.finetune_tokens_per_s / best:.2f}x" if best else "-"
        print(
            f"{r.policy:<10} {r.requests:>4} {r.failed:>5} {r.tpot_p50_ms:>8.1f}  {r.tpot_p99_ms:>8.1f}  "
            f"{r.slo_attainment:>8.3f}  {r.finetune_tokens_per_s:>14.0f}  {ratio:>8}"
        )
    if "harli" in results and alone:
        h = results["harli"]
        ceiling = alone * (1 - h.forward_fraction)
        free = 1 - h.forward_fraction
        print(
            f"\nslack ceiling {ceiling:.0f} tokens/s (alone {alone:.0f} x free {free:.3f}); "
            f"harli reaches {h.finetune_tokens_per_s / ceiling:.2f} of it; predictor MAPE solo "
            f"{h.predictor_solo_mape:.3f}, co-run {h.predictor_corun_mape:.3f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "results": {k: msgspec.to_builtins(v) for k, v in results.items()},
                    "measured": measured,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
