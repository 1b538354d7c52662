"""Soak: a provider's week of traffic compressed into minutes, on one real server over loopback.

Streaming clients keep decode busy the whole time, some of them asking for adapters trained earlier in the
run, while finetune jobs are submitted, published (a new version every few steps, hot-swapped under
live requests), cancelled mid-run or left to complete, one cycle after another. Afterwards it reports the
requests served and failed, the server's resident memory after every cycle (all its processes), and
whether every lent KV page came back. ``test/server/test_soak.py`` runs a short soak and asserts on the same
report; ``python -m benchmark.soak --cycles N`` runs a longer one for ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import threading
import time
from pathlib import Path

import msgspec
import psutil
import requests

from sglang_harli.server_process import ServerProcess

SERVER_FLAGS = [
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--lora-target-modules",
    "all",
    "--max-loras-per-batch",
    "4",
    "--harli-kv-poison",
    # Reliability, not QoS, is measured here: a loose SLO leaves training slack even on a busy laptop.
    "--harli-tpot-slo-ms",
    "500",
]
WORDS = "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lumen maple nectar".split()


class SoakReport(msgspec.Struct, kw_only=True):
    cycles: int
    seconds: float
    requests: int
    failures: int
    failure_samples: list[str]
    adapter_requests: int
    jobs_completed: int
    jobs_cancelled: int
    versions_published: int
    rss_mib: list[float]
    """Resident memory of the server's processes after each cycle."""
    lent_tokens_end: int
    free_tokens_end: int
    cached_tokens_end: int
    pool_tokens: int
    ordinary_activation_bytes_end: int
    poison_violations: int
    job_states: dict[str, str]


def server_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def records(seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": f"Code {seed}-{i}:", "completion": " " + " ".join(rng.sample(WORDS, 3))} for i in range(12)
    ]


def job(name: str, seed: int) -> dict:
    return {
        "name": name,
        "dataset": {"records": records(seed)},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "training": {"epochs": 3, "learning_rate": 0.01, "micro_batch_size": 3, "max_seq_len": 64},
        "publish": {"every_steps": 3},
    }


class Clients:
    """Streaming decode load: ``count`` clients, each request a greedy stream with a random adapter."""

    def __init__(self, url: str, count: int):
        self.url, self.count = url, count
        self.adapters: list[str] = []
        self.requests = self.failures = self.adapter_requests = 0
        self.samples: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        while not self._stop.is_set():
            adapter = rng.choice([None, *self.adapters])
            body = {
                "text": f"Code {rng.randrange(100)}-{rng.randrange(12)}:",
                "stream": True,
                "sampling_params": {
                    "max_new_tokens": rng.randint(4, 48),
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }
            if adapter:
                body["lora_path"] = adapter
            error = None
            try:
                with requests.post(f"{self.url}/generate", json=body, stream=True, timeout=120) as resp:
                    if resp.status_code != 200:
                        error = f"{resp.status_code} {resp.text[:200]}"
                    else:
                        chunks = [line for line in resp.iter_lines() if line.startswith(b"data:")]
                        if chunks[-1:] != [b"data: [DONE]"] or len(chunks) < 2:
                            error = f"stream ended early after {len(chunks)} chunks"
            except requests.RequestException as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.requests += 1
                self.adapter_requests += adapter is not None
                if error:
                    self.failures += 1
                    if len(self.samples) < 5:
                        self.samples.append(f"{adapter or 'base'}: {error}")


def wait_job(server: ServerProcess, name: str, until, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = server.get(f"/harli/jobs/{name}").json()
        if until(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def finished(status: dict) -> bool:
    return status["state"] in ("completed", "failed", "cancelled")


def run_soak(server: ServerProcess, *, cycles: int, clients: int = 3, min_requests: int = 0) -> SoakReport:
    """``cycles`` jobs under ``clients`` streaming clients; the clients go on past the last job until they
    have sent ``min_requests`` (how much decode a cycle sees depends on how fast jobs train here)."""
    started = time.monotonic()
    rss, states, published = [], {}, 0
    with Clients(server.url, clients) as load:
        for cycle in range(cycles):
            name = f"soak-{cycle}"
            resp = server.post("/harli/jobs", job(name, cycle))
            if resp.status_code != 201:
                raise RuntimeError(f"job {name} refused: {resp.text}")
            if cycle % 2:  # cancelled mid-run, after it published a version
                wait_job(server, name, lambda s: s["published"] or finished(s))
                server.post(f"/harli/jobs/{name}/cancel", {})
            status = wait_job(server, name, finished)
            states[name] = status["state"] if finished(status) else f"stuck {status['state']}"
            published += len(status["published"])
            if any(v["loaded"] for v in status["published"]):
                load.adapters.append(name)
            rss.append(server_rss(server.proc.pid) / 2**20)
        while load.requests < min_requests:
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while True:  # the last streams finish and their pages return to the pool
        memory = server.get("/harli/stats").json()["finetune"]["memory"]
        idle = memory["free_tokens"] + memory["cached_tokens"] == memory["pool_tokens"]
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return SoakReport(
        cycles=cycles,
        seconds=round(time.monotonic() - started, 1),
        requests=load.requests,
        failures=load.failures,
        failure_samples=load.samples,
        adapter_requests=load.adapter_requests,
        jobs_completed=sum(s == "completed" for s in states.values()),
        jobs_cancelled=sum(s == "cancelled" for s in states.values()),
        versions_published=published,
        rss_mib=[round(r, 1) for r in rss],
        lent_tokens_end=memory["lent_tokens"],
        free_tokens_end=memory["free_tokens"],
        cached_tokens_end=memory["cached_tokens"],
        pool_tokens=memory["pool_tokens"],
        ordinary_activation_bytes_end=memory["activations"]["ordinary_bytes"],
        poison_violations=memory["poison_violations"],
        job_states=states,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--model", default="harli:tiny")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=Path("/tmp/harli-soak.log"))
    args = parser.parse_args()
    with ServerProcess(["--model-path", args.model, *SERVER_FLAGS], args.log) as server:
        report = run_soak(server, cycles=args.cycles, clients=args.clients)
    memory_gib = psutil.virtual_memory().total / 2**30
    result = {
        "command": "python -m benchmark.soak "
        f"--cycles {args.cycles} --clients {args.clients} --model {args.model}",
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {memory_gib:.0f} GiB",
        **msgspec.structs.asdict(report),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
