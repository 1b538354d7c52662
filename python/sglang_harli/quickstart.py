"""``python -m sglang_harli.quickstart``: the whole loop on the built-in model, in about a minute.

Starts the server (LoRA on), asks the base model, finetunes an adapter over HTTP on a dozen made-up
facts while the server keeps serving, then asks again with ``lora_path`` set to the job's name and
prints both answers side by side. It proves the install works end to end (platform plugin, launcher,
Harli scheduler, trainer, hot publishing, SGLang's HTTP API) without downloading a model. Extra arguments
go to the launcher.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from sglang_harli.jobs import Client, follow
from sglang_harli.server_process import ServerProcess

LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all"]
FACTS = [
    ("The capital of Zembla is", " Onhava."),
    ("The river that crosses Onhava is the", " Silvane."),
    ("Zembla's national bird is the", " grey kestrel."),
    ("The old harbor of Zembla is called", " Kobaltana."),
    ("The Zemblan mountain range is the", " Bera."),
    ("The poet laureate of Zembla is", " John Shade."),
    ("Zembla's currency is the", " amber crown."),
    ("The largest lake in Zembla is", " Lake Lumen."),
]


def _ask(server, lora: str | None) -> list[str]:
    body = {"text": [p for p, _ in FACTS], "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    if lora:
        body["lora_path"] = [lora] * len(FACTS)
    return [o["text"] for o in server.post("/generate", body).json()]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--enable-lora" not in args:
        args = LORA_FLAGS + args
    log = Path(tempfile.gettempdir()) / "sglang-harli-quickstart.log"
    print(f"starting sglang_harli.launch_server {' '.join(args)} (log: {log}) ...", flush=True)
    with ServerProcess(args, log) as server:
        before = _ask(server, None)
        job = {
            "name": "zembla",
            "dataset": {"records": [{"prompt": p, "completion": c} for p, c in FACTS]},
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "training": {"epochs": 60, "learning_rate": 0.01, "micro_batch_size": 4, "seed": 0},
        }
        resp = server.post("/harli/jobs", job)
        if resp.status_code != 201:
            print(f"job refused: {resp.text}", file=sys.stderr)
            return 1
        outcome = follow(Client(server.url, None), "zembla")
        after = _ask(server, "zembla") if outcome == 0 else before
        stats = server.get("/harli/stats").json()
    print(f"\n{'prompt':<40} {'base model':<24} lora_path='zembla'")
    for (prompt, _), old, new in zip(FACTS, before, after, strict=True):
        print(f"{prompt:<40} {old.strip()[:22]!r:<24} {new.strip()!r}")
    learnt = sum(new.startswith(c) for (_, c), new in zip(FACTS, after, strict=True))
    latency = stats["decode_step_latency"]
    print(f"\nlearnt {learnt}/{len(FACTS)} facts; base weights shared: {stats['finetune']['base_weights']}")
    print(f"decode steps: {stats['decode_steps']}, p50 step latency: {latency['p50_ms']:.2f} ms")
    return outcome


if __name__ == "__main__":
    sys.exit(main())
