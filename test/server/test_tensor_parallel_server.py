"""``--tp-size 2`` through the real server: SGLang's own TP ranks (gloo on CPU) each train their slice of
the adapter beside their slice of the served weights; the adapter the server writes and serves equals the
one-rank trainer's on the same data, and decode is untouched while it trains.

The ``small`` preset is used because its MLP width splits evenly; SGLang pads the tiny model's on CPU,
which training refuses (see ``srt.tensor_parallel``).
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.servers import SERVER_ARGS
from sglang_harli.core.jobs.data import build_examples
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.models.builtin import materialize
from sglang_harli.server_process import ServerProcess

pytestmark = pytest.mark.server

RECORDS = [{"prompt": f"Item {i}:", "completion": f" the code for {i} is {i * 7 % 13}."} for i in range(12)]
LORA = {
    "r": 4,
    "alpha": 8,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
TRAINING = {
    "epochs": 1,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 5e-3,
    "max_grad_norm": 0.5,
    "seed": 4,
}
PROMPTS = ["Item 3:", "Item 8:", "The weather"]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def small_dir():
    return materialize("small")


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2")
    args = [
        *SERVER_ARGS,
        "--model-path",
        "harli:small",
        "--tp-size",
        "2",
        "--harli-output-dir",
        str(run_dir / "adapters"),
    ]
    with ServerProcess(args, run_dir / "server.log") as srv:
        yield srv


def _wait(srv: ServerProcess, name: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = srv.get(f"/harli/jobs/{name}").json()
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise TimeoutError(name)


def _generate(srv: ServerProcess, lora_path: str | None = None) -> list[list[int]]:
    body = {"text": PROMPTS, "sampling_params": GREEDY}
    if lora_path:
        body["lora_path"] = [lora_path] * len(PROMPTS)
    resp = srv.post("/generate", body)
    assert resp.status_code == 200, resp.text
    return [item["output_ids"] for item in resp.json()]


def test_two_ranks_train_and_serve_the_one_rank_adapter(tp_server, small_dir, tmp_path):
    srv = tp_server
    base = _generate(srv)
    resp = srv.post(
        "/harli/jobs", {"name": "tp", "dataset": {"records": RECORDS}, "lora": LORA, "training": TRAINING}
    )
    assert resp.status_code == 201, resp.text
    during = _generate(srv)  # decode while both ranks train
    job = _wait(srv, "tp")
    assert job["state"] == "completed", job
    assert during == base  # training never changes what decode computes

    # The one-rank reference: the same examples, tokenized as the server does, on the whole model.
    tokenizer = AutoTokenizer.from_pretrained(small_dir)
    examples, _ = build_examples(RECORDS, tokenizer, max_seq_len=512, where=str)
    model = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32)
    model.requires_grad_(False)
    reference = LoraTrainer(model, examples, LoraSpec(**LORA), TrainingSpec(**TRAINING))
    reference.run()
    reference.save_adapter(str(tmp_path / "reference"))

    # What float32 holds exactly is the loss. The weights are Adam-updated: where a gradient entry is near
    # zero, two orders of summation (two ranks, one) can give it either sign, and Adam moves that weight a
    # whole step either way; so no float32 tolerance on every updated weight is safe on every CPU (the
    # float64 comparison is test_tensor_parallel.py's). Each weight is within the steps Adam can take (at
    # most about lr per step, bias-corrected), and the typical weight agrees to float32 rounding: a missing
    # or doubled reduction moves every weight of a module, not a few.
    assert job["loss"] == pytest.approx(reference.loss, rel=1e-4)
    served = load_file(f"{job['adapter_path']}/adapter_model.safetensors")
    expected = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert served.keys() == expected.keys()
    steps_bound = 2 * TRAINING["learning_rate"] * reference.step
    for name, tensor in expected.items():
        assert served[name].shape == tensor.shape, name  # gathered: the full PEFT shapes
        difference = (served[name].double() - tensor.double()).abs()
        assert float(difference.max()) <= steps_bound, name
        assert float(difference.median()) <= 1e-6 + 1e-5 * float(tensor.abs().median()), name

    # Served hot on both ranks: the adapter changes what the model says.
    tuned = _generate(srv, "tp")
    assert tuned != base
    assert _generate(srv, "tp") == tuned
