"""Durable jobs (``--harli-state-dir``): a server killed mid-job resumes it after a restart, the resumed
job's adapter equals an uninterrupted run's bit for bit, and adapters published before the crash serve
again before the restarted server reports healthy."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import SERVER_ARGS
from sglang_harli.server_process import ServerProcess
from test_jobs import PROMPTS, RECORDS, finished, generate, job_spec, wait_for

pytestmark = pytest.mark.server


def ids(server, lora_path):
    return [o["output_ids"] for o in generate(server, PROMPTS, lora_path)]


def adapter(status) -> dict:
    return load_file(str(Path(status["adapter_path"]) / "adapter_model.safetensors"))


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
    interrupted = job_spec("interrupted", {"records": RECORDS}, epochs=12)  # 48 steps
    interrupted["publish"] = {"every_steps": 10}

    with ServerProcess(args, tmp_path / "first.log") as srv:
        assert srv.post("/harli/jobs", done).status_code == 201
        assert wait_for(srv, "done-before", finished)["state"] == "completed"
        served_before = ids(srv, "done-before")
        assert srv.post("/harli/jobs", interrupted).status_code == 201
        wait_for(srv, "interrupted", lambda s: s["step"] >= 17)
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
        assert resumed["resumes"] == 1 and resumed["step"] == resumed["total_steps"] == 48
        assert "torn" in srv.log_path.read_text()  # the damaged checkpoint was noticed and passed over

        reference = job_spec("uninterrupted", {"records": RECORDS}, epochs=12)
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
