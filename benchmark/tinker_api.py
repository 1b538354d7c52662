"""The Tinker API against a finetune job on the same data, and decode's TPOT while a Tinker loop trains.

One server (one thread), one open-loop decode load throughout (the fleet benchmark's seeded bursty trace,
streamed). Three windows, the last two alternating their order over the repeats:

- ``decode``: the load alone, for its TPOT;
- ``job``: a finetune job (``POST /harli/jobs``) of the texts, ``--epochs`` epochs, 4 examples a step;
- ``tinker``: the official ``tinker`` SDK's loop over the same texts, tokenized by the client as the
  cookbook tokenizes, the same LoRA (rank 16 on the attention projections), 4 datums a
  ``forward_backward`` followed by an ``optim_step``, for the same epochs.

Reported per window: training tokens per second (tokens trained over the seconds from the first
submission to the last result: the job's includes its tokenization and publishing, the loop's every
HTTP round trip and poll), and the decode requests' TPOT p50/p99 and share within the SLO. The ratio
``tinker / job`` of tokens per second is what the API costs over a job.

    python -m benchmark.tinker_api                 # preset `tiny`, the figures in RESULTS.md
    python -m benchmark.tinker_api --model small   # a larger model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import msgspec
import numpy as np
import requests
import tinker
from tinker import types
from transformers import AutoTokenizer

from benchmark.fleet import Load, texts
from sglang_harli.models.builtin import PRESET_SCHEME, materialize
from sglang_harli.server_process import ServerProcess

KEY = "bench-tinker-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLO_MS = 100.0
BATCH = 4
MAX_TOKENS = 64


class Window(msgspec.Struct, kw_only=True):
    kind: str
    repeat: int
    seconds: float
    tokens: int = 0
    tpot_p50_ms: float
    tpot_p99_ms: float
    within_slo: float
    """Share of decode requests whose mean token interval met the SLO."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.tokens else 0.0


class Report(msgspec.Struct, kw_only=True):
    model: str
    rate: float
    epochs: int
    windows: list[Window]
    tinker_over_job: float
    """Median training tokens/s through the Tinker API over a job's."""


def _window(kind: str, repeat: int, seconds: float, tokens: int, tpots: list[float]) -> Window:
    ms = np.asarray(tpots) * 1e3 if tpots else np.asarray([float("nan")])
    return Window(
        kind=kind, repeat=repeat, seconds=seconds, tokens=tokens,
        tpot_p50_ms=float(np.percentile(ms, 50)), tpot_p99_ms=float(np.percentile(ms, 99)),
        within_slo=float(np.mean(ms <= SLO_MS)),
    )  # fmt: skip


def run_job(server: ServerProcess, records: list[str], epochs: int, name: str) -> tuple[float, int]:
    spec = {
        "name": name,
        "dataset": {"records": [{"text": text} for text in records]},
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"epochs": epochs, "learning_rate": 0.005, "micro_batch_size": BATCH,
                     "max_seq_len": MAX_TOKENS},
    }  # fmt: skip
    started = time.perf_counter()
    resp = requests.post(f"{server.url}/harli/jobs", json=spec, headers=AUTH, timeout=120)
    assert resp.status_code == 201, resp.text
    while (status := server.get(f"/harli/jobs/{name}", headers=AUTH).json())["state"] not in (
        "completed", "failed", "cancelled",
    ):  # fmt: skip
        time.sleep(0.2)
    assert status["state"] == "completed", status
    return time.perf_counter() - started, status["tokens_trained"]


def run_tinker(
    server: ServerProcess, tokenized: list[list[int]], epochs: int, base_model: str
) -> tuple[float, int]:
    datums = [
        types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
        )
        for ids in tokenized
    ]
    with tinker.ServiceClient(base_url=server.url, api_key=f"tml-{KEY}") as service:
        training = service.create_lora_training_client(
            base_model=base_model, rank=16, train_mlp=False
        ).result()
        adam = types.AdamParams(learning_rate=0.005)
        started, tokens = time.perf_counter(), 0
        for _ in range(epochs):
            for start in range(0, len(datums), BATCH):
                batch = datums[start : start + BATCH]
                forward_backward = training.forward_backward(batch, "cross_entropy")
                step = training.optim_step(adam)
                forward_backward.result()
                step.result()
                tokens += sum(d.model_input.length for d in batch)
        return time.perf_counter() - started, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="built-in preset (default: tiny)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean decode requests/s")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--decode-s", type=float, default=30.0, help="length of the decode-only window")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/tinker_api.json"))
    parser.add_argument("--log", type=Path, default=Path("benchmark/results/tinker_api-server.log"))
    args = parser.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    model_dir = materialize(args.model)
    base_model = f"{PRESET_SCHEME}{args.model}"
    flags = [
        "--model-path", base_model, "--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all",
        "--admin-api-key", KEY, "--harli-tpot-slo-ms", str(SLO_MS),
    ]  # fmt: skip
    records = texts(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = [tokenizer(text)["input_ids"][:MAX_TOKENS] for text in records]
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    windows: list[Window] = []
    with ServerProcess(flags, args.log, env={"OMP_NUM_THREADS": "1"}) as server:
        for repeat in range(args.repeats):
            with Load(server.url, 200 + repeat, args.rate) as load:
                time.sleep(args.decode_s)
            windows.append(_window("decode", repeat, args.decode_s, 0, load.tpots))
            order = ("job", "tinker") if repeat % 2 == 0 else ("tinker", "job")
            for kind in order:
                with Load(server.url, 300 + repeat, args.rate) as load:
                    if kind == "job":
                        seconds, tokens = run_job(server, records, args.epochs, f"bench-tinker-job-{repeat}")
                    else:
                        seconds, tokens = run_tinker(server, tokenized, args.epochs, base_model)
                windows.append(_window(kind, repeat, seconds, tokens, load.tpots))
                print(json.dumps(msgspec.to_builtins(windows[-1])), flush=True)
    rates = {
        kind: statistics.median(w.tokens_per_s for w in windows if w.kind == kind)
        for kind in ("job", "tinker")
    }
    report = Report(
        model=args.model, rate=args.rate, epochs=args.epochs, windows=windows,
        tinker_over_job=rates["tinker"] / rates["job"],
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    header = f"{'window':>7} {'repeat':>6} {'seconds':>8} {'tokens':>7} {'tokens/s':>9}"
    print(f"\n{header} {'TPOT p50/p99 ms':>16} {'in SLO':>7}")
    for w in windows:
        print(
            f"{w.kind:>7} {w.repeat:>6} {w.seconds:>8.1f} {w.tokens:>7} {w.tokens_per_s:>9.0f}"
            f" {w.tpot_p50_ms:>7.1f}/{w.tpot_p99_ms:<8.1f} {w.within_slo:>7.0%}"
        )
    print(f"\ntraining tokens/s, Tinker API / job: {report.tinker_over_job:.2f}x")


if __name__ == "__main__":
    main()
