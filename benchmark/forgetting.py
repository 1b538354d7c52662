"""``python -m benchmark.forgetting``: retention probes catch an over-trained job forgetting, and early
stopping with ``publish: "best"`` serves an adapter that still knows what the base model knew.

On the real ``harli:smollm2-135m`` server, two jobs on four made-up facts, both over-trained as a user
might (LoRA r=16 on all seven projections, learning rate 1e-2 after 10 warmup steps, 100 epochs):

1. ``overtrained``: evaluated on the model's built-in retention probes every 2 steps; the status shows
   retention falling while the training loss keeps going down.
2. ``guarded``: the same, plus an eval set (paraphrases of the facts, and eight other general questions
   with the base model's own answers as targets), evaluated every step, ``training.early_stopping``
   (patience 3) and ``publish: "best"``.

Then each served adapter is asked the probes and the facts through ``/v1/chat/completions``. Writes
``benchmark/results/forgetting.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sglang_harli.models.builtin import PACKAGED, materialize
from sglang_harli.server_process import ServerProcess

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
GENERAL = [  # other questions than the probes: the base model's answers are the eval targets
    "What is the capital of Canada?",
    "What is the chemical symbol for gold?",
    "What is the opposite of big?",
    "Who wrote Hamlet?",
    "What is the capital of Egypt?",
    "What language is spoken in Mexico?",
    "What is the largest ocean on Earth?",
    "What is the currency of Japan?",
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


def run_job(server: ServerProcess, spec: dict, log) -> dict:
    response = server.post("/harli/jobs", spec)
    if response.status_code != 201:
        raise RuntimeError(response.text)
    while (status := server.get(f"/harli/jobs/{spec['name']}").json())["state"] not in (
        "completed",
        "failed",
        "cancelled",
    ):
        time.sleep(1)
    log(f"{spec['name']}: {status['state']} at step {status['step']}/{status['total_steps']}")
    if status["state"] != "completed":
        raise RuntimeError(status.get("error"))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forgetting.json")
    parser.add_argument("--log", type=Path, default=Path("/tmp/harli-forgetting.log"))
    parser.add_argument("--every", type=int, default=1, help="eval.every_steps of the guarded job")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="training.warmup_steps of both jobs")
    parser.add_argument("--skip-overtrained", action="store_true")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    materialize(MODEL)
    flags = ["--model-path", f"harli:{MODEL}", "--enable-lora", "--max-lora-rank", "16"]
    flags += ["--lora-target-modules", "all"]
    probe_questions, probe_words = [q for q, _ in PROBES], [w for _, w in PROBES]
    fact_questions, fact_words = [q for q, _, _ in FACTS], [w for _, _, w in FACTS]
    with ServerProcess(flags, args.log) as server:
        base_general = ask(server, GENERAL, None)
        base_probes = ask(server, probe_questions, None)
        common = {
            "dataset": {"records": [chat(q, a) for q, a, _ in FACTS]},
            "lora": {"r": 16, "alpha": 32, "target_modules": ALL_MODULES},
            # warmup as HF users set it; the rate still reaches 1e-2 by step 10, which erases what it knew
            "training": {
                "epochs": 100,
                "learning_rate": 0.01,
                "warmup_steps": args.warmup,
                "micro_batch_size": 4,
                "seed": 0,
            },
        }
        overtrained = run_job(
            server,
            {"name": "overtrained", **common, "eval": {"retention": "builtin", "every_steps": 2}},
            log,
        )
        eval_records = [chat(q, FACTS[i][1]) for q, i in PARAPHRASES]
        eval_records += [chat(q, a) for q, a in zip(GENERAL, base_general, strict=True)]
        guarded_spec = {
            "name": "guarded",
            **common,
            "training": {**common["training"], "early_stopping": {"patience": args.patience}},
            "eval": {"records": eval_records, "retention": "builtin", "every_steps": args.every},
            "publish": "best",
        }
        guarded = run_job(server, guarded_spec, log)
        result = {
            "base": {"probes_kept": count(base_probes, probe_words), "probes": len(PROBES)},
            "jobs": {},
        }
        for status in (s for s in (overtrained, guarded) if s is not None):
            name = status["name"]
            probes = ask(server, probe_questions, name)
            facts = ask(server, fact_questions, name)
            paraphrased = ask(server, [q for q, _ in PARAPHRASES], name)
            result["jobs"][name] = {
                "steps": status["step"],
                "total_steps": status["total_steps"],
                "stopped_early": status["stopped_early"],
                "best_step": status["best_step"],
                "published_step": status["published"][-1]["step"],
                "final_train_loss": status["loss"],
                "evals": status["evals"],
                "served_probes_kept": count(probes, probe_words),
                "served_facts_learnt": count(facts, fact_words),
                "served_paraphrases_right": count(paraphrased, [fact_words[i] for _, i in PARAPHRASES]),
                "answers": {"probes": probes, "facts": facts, "paraphrases": paraphrased},
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    probes = result["base"]["probes"]
    lines = [
        "| job | steps run | published step | retention at each eval (step: kept) "
        "| served: probes kept | facts learnt | paraphrases right |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, job in result["jobs"].items():
        trail = ", ".join(f"{e['step']}: {e['retention_kept']}" for e in job["evals"])
        early = " (stopped early)" if job["stopped_early"] else ""
        lines.append(
            f"| `{name}` | {job['steps']}/{job['total_steps']}{early} "
            f"| {job['published_step']} | {trail} | {job['served_probes_kept']}/{probes} "
            f"| {job['served_facts_learnt']}/4 | {job['served_paraphrases_right']}/4 |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
