"""Durable jobs (``--harli-state-dir``): a server killed mid-job resumes it after a restart, the resumed
job's adapter equals an uninterrupted run's bit for bit, and adapters published before the crash serve
again before the restarted server reports healthy. A Tinker loop on the same server loses no step it saw
acknowledged: ``create_training_client_from_state_with_optimizer`` resumes it exactly. The interrupted job
rehearses: its base-model answers survive the restart with its examples."""

from pathlib import Path

import pytest
import tinker
from safetensors.torch import load_file
from tinker import types

from helpers.jobs import PROMPTS, RECORDS, finished, generate, job_spec, wait_for
from helpers.servers import SERVER_ARGS
from sglang_harli.server_process import ServerProcess

pytestmark = pytest.mark.server


def ids(server, lora_path):
    return [o["output_ids"] for o in generate(server, PROMPTS, lora_path)]


def adapter(status) -> dict:
    return load_file(str(Path(status["adapter_path"]) / "adapter_model.safetensors"))


DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 6, 7, 8, 9, 10]),
    loss_fn_inputs={"target_tokens": [6, 7, 8, 9, 10, 11], "weights": [1.0] * 6},
)
ADAM = types.AdamParams(learning_rate=1e-2)


def _step_and_logprobs(training) -> list[float]:
    training.forward_backward([DATUM], "cross_entropy").result()
    training.optim_step(ADAM).result()
    return training.forward([DATUM], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data


def tinker_loop_saved(server) -> tuple[str, list[float]]:
    """Three steps, each saved (acknowledged); then the logprobs one more step gives from that state."""
    with tinker.ServiceClient(base_url=server.url, api_key="tml-local") as service:
        training = service.create_lora_training_client(base_model="harli:tiny", rank=8).result()
        for step in range(3):
            _step_and_logprobs(training)
            saved = training.save_state(f"step{step}").result().path
        return saved, _step_and_logprobs(training)


def tinker_loop_resumes(server, saved: str, expected: list[float]) -> None:
    with tinker.ServiceClient(base_url=server.url, api_key="tml-local") as service:
        training = service.create_training_client_from_state_with_optimizer(saved).result()
        assert _step_and_logprobs(training) == pytest.approx(expected, abs=1e-5)
        # the weights-only load starts AdamW afresh: the same step then lands elsewhere
        fresh = service.create_training_client_from_state(saved).result()
        assert _step_and_logprobs(fresh) != pytest.approx(expected, abs=1e-5)


def test_a_killed_server_resumes_its_job_exactly_and_serves_its_adapters_again(tmp_path, tiny_model_dir):
    state = tmp_path / "state"
    args = [
        *SERVER_ARGS,
        "--harli-state-dir",
        str(state),
        "--harli-output-dir",
        str(tmp_path / "adapters"),
        "--harli-checkpoint-every-steps",
        "3",
    ]
    done = job_spec("done-before", {"records": RECORDS}, epochs=2)
    # with rehearsal: the base model's answers are stored with the examples and trained on again after the
    # restart (2 answers an epoch beside 16 examples, 4 a step: 30 steps)
    rehearsal = {"prompts": ["Code 98:", [{"role": "user", "content": "Code 99:"}]], "ratio": 0.25}
    interrupted = job_spec("interrupted", {"records": RECORDS}, epochs=6) | {"rehearsal": rehearsal}
    interrupted["publish"] = {"every_steps": 10}

    with ServerProcess(args, tmp_path / "first.log") as srv:
        saved, expected = tinker_loop_saved(srv)
        assert srv.post("/harli/jobs", done).status_code == 201
        assert wait_for(srv, "done-before", finished)["state"] == "completed"
        served_before = ids(srv, "done-before")
        assert srv.post("/harli/jobs", interrupted).status_code == 201
        wait_for(srv, "interrupted", lambda s: s["step"] >= 13)
        srv.kill()

    checkpoints = sorted((state / "jobs" / "interrupted" / "checkpoints").glob("step-*"))
    assert checkpoints, "no checkpoint was written before the kill"
    newest = checkpoints[-1] / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn, as by a crash mid-write

    with ServerProcess(args, tmp_path / "second.log") as srv:
        # Healthy means the adapters that served before the crash serve again, unchanged.
        assert ids(srv, "done-before") == served_before
        before = srv.get("/harli/jobs/done-before").json()
        assert before["state"] == "completed" and before["published"][-1]["loaded"]

        resumed = wait_for(srv, "interrupted", finished)
        assert resumed["state"] == "completed", resumed
        assert resumed["resumes"] == 1 and resumed["step"] == resumed["total_steps"] == 30
        assert resumed["rehearsal_examples"] == 2
        assert "torn" in srv.log_path.read_text()  # the damaged checkpoint was noticed and passed over
        tinker_loop_resumes(srv, saved, expected)

        reference = job_spec("uninterrupted", {"records": RECORDS}, epochs=6) | {"rehearsal": rehearsal}
        assert srv.post("/harli/jobs", reference).status_code == 201
        uninterrupted = wait_for(srv, "uninterrupted", finished)
        assert uninterrupted["state"] == "completed", uninterrupted
        got, want = adapter(resumed), adapter(uninterrupted)
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in want)  # bit for bit
        assert ids(srv, "interrupted") == ids(srv, "uninterrupted")

    # A finished job keeps only its record; its dataset copy and checkpoints are gone.
    assert not (state / "jobs" / "interrupted" / "checkpoints").exists()
    assert not (state / "jobs" / "interrupted" / "examples.msgpack").exists()
