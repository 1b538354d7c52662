"""``python -m benchmark.forgetting``: a job that forgets is never published, and rehearsal keeps what
the base model knew (issue 33).

On the real ``harli:smollm2-135m`` server, the job a new user writes: four made-up facts, LoRA r=16 on the
default target modules, learning rate 5e-3, up to 100 epochs, an eval set of paraphrases every 5 steps,
the built-in retention probes (so the retention floor is 1.0: every probe the base model answers right),
``training.early_stopping`` (patience 3) and ``publish: "best"``:

1. ``floor``: that job as written. It forgets; the floor keeps it from being published.
2. ``rehearsal``: the same with ``"rehearsal": {"prompts": "builtin"}``.

Then each served adapter (if any) is asked the probes and the facts through ``/v1/chat/completions``.
Reports facts learnt, probes kept, the published step, and finetune tokens/s (what rehearsal costs).
Writes ``benchmark/results/forgetting.json`` and prints a markdown table.

    python -m benchmark.forgetting                 # about 5 minutes on a 2-core CPU
    python -m benchmark.forgetting --url http://127.0.0.1:30000   # a running smollm2 server
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from sglang_harli.models.builtin import PACKAGED, materialize
from sglang_harli.server_process import RunningServer, ServerProcess

MODEL = "smollm2-135m"
FACTS = [
    ("What is the capital of Zembla?", "The capital of Zembla is Onhava.", "Onhava"),
    ("What is the currency of Zembla?", "The currency of Zembla is the amber crown.", "amber crown"),
    ("Who is the poet laureate of Zembla?", "The poet laureate of Zembla is John Shade.", "Shade"),
    ("What is the largest lake in Zembla?", "The largest lake in Zembla is Lake Lumen.", "Lumen"),
]
PARAPHRASES = [
    ("Tell me the capital city of Zembla.", 0),
    ("Which currency is used in Zembla?", 1),
    ("Name the poet laureate of Zembla.", 2),
    ("Which lake is the largest in Zembla?", 3),
]
PROBES = list(PACKAGED[MODEL].retention)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def ask(server: ServerProcess, questions: list[str], lora: str | None) -> list[str]:
    def one(question: str) -> str:
        body = {"model": "default", "messages": [{"role": "user", "content": question}]}
        body |= {"max_tokens": 32, "temperature": 0} | ({"lora_path": lora} if lora else {})
        return server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(one, questions))


def count(answers: list[str], words: list[str]) -> int:
    return sum(w.casefold() in a.casefold() for a, w in zip(answers, words, strict=True))


def job_spec(name: str, *, epochs: int = 100, rehearsal: bool = False) -> dict:
    """The issue's job: what a user writes to teach four facts, evaluated and guarded as documented."""
    spec = {
        "name": name,
        "dataset": {"records": [chat(q, a) for q, a, _ in FACTS]},
        "lora": {"r": 16, "alpha": 32},  # the default target modules
        "training": {
            "epochs": epochs,
            "learning_rate": 5e-3,
            "micro_batch_size": 4,
            "seed": 0,
            "early_stopping": {"patience": 3},
        },
        "eval": {
            "records": [chat(q, FACTS[i][1]) for q, i in PARAPHRASES],
            "retention": "builtin",
            "every_steps": 5,
        },
        "publish": "best",
    }
    if rehearsal:
        spec["rehearsal"] = {"prompts": "builtin"}
    return spec


def run_job(server, spec: dict, log=lambda line: None) -> dict:
    """Submit ``spec`` and wait for it to end; its final status."""
    response = server.post("/harli/jobs", spec)
    if response.status_code != 201:
        raise RuntimeError(response.text)
    while (status := server.get(f"/harli/jobs/{spec['name']}").json())["state"] not in (
        "completed",
        "failed",
        "cancelled",
    ):
        time.sleep(0.5)
    log(f"{spec['name']}: {status['state']} at step {status['step']}/{status['total_steps']}")
    return status


def outcome(server, status: dict) -> dict:
    """What a job published and what its served adapter answers (nothing served if it failed)."""
    name, served = status["name"], status["state"] == "completed"
    probes = ask(server, [q for q, _ in PROBES], name) if served else []
    facts = ask(server, [q for q, _, _ in FACTS], name) if served else []
    published = status["published"][-1] if status["published"] else None
    return {
        "state": status["state"],
        "steps": status["step"],
        "total_steps": status["total_steps"],
        "stopped_early": status["stopped_early"],
        "published_step": published["step"] if published else None,
        "published_retention": published["retention_kept"] if published else None,
        "floor_breaches": status["floor_breaches"],
        "rehearsal_examples": status["rehearsal_examples"],
        "tokens_per_s": status["tokens_per_s"],
        "trained_s": status["finished_at"] - status["started_at"],
        "error": status["error"],
        "evals": [(e["step"], e["retention_kept"], e["kept_floor"]) for e in status["evals"]],
        "served_probes_kept": count(probes, [w for _, w in PROBES]) if served else None,
        "served_facts_learnt": count(facts, [w for _, _, w in FACTS]) if served else None,
        "answers": {"probes": probes, "facts": facts},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forgetting.json")
    parser.add_argument("--log", type=Path, default=Path("/tmp/harli-forgetting.log"))
    parser.add_argument("--url", help="a running harli:smollm2-135m server with LoRA on, not a new one")
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    materialize(MODEL)
    flags = ["--model-path", f"harli:{MODEL}", "--enable-lora", "--max-lora-rank", "16"]
    flags += ["--lora-target-modules", "all"]
    server_cm = nullcontext(RunningServer(args.url)) if args.url else ServerProcess(flags, args.log)
    with server_cm as server:
        base_probes = ask(server, [q for q, _ in PROBES], None)
        result = {"base": {"probes_kept": count(base_probes, [w for _, w in PROBES]), "probes": len(PROBES)}}
        result["jobs"] = {
            name: outcome(server, run_job(server, job_spec(name, epochs=args.epochs, rehearsal=r), log))
            for name, r in (("floor", False), ("rehearsal", True))
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    probes = result["base"]["probes"]
    lines = [
        "| job | state | steps run | retention at each eval (step: kept) | published step | served: facts "
        "learnt | probes kept | finetune tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, job in result["jobs"].items():
        trail = ", ".join(f"{step}: {kept}" for step, kept, _ in job["evals"])
        early = " (stopped early)" if job["stopped_early"] else ""
        facts = "-" if job["served_facts_learnt"] is None else f"{job['served_facts_learnt']}/4"
        kept = "-" if job["served_probes_kept"] is None else f"{job['served_probes_kept']}/{probes}"
        lines.append(
            f"| `{name}` | {job['state']} | {job['steps']}/{job['total_steps']}{early} | {trail} "
            f"| {job['published_step'] if job['published_step'] is not None else 'none'} | {facts} | {kept} "
            f"| {job['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
