"""``python -m sglang_harli.jobs`` against a real server: what the CLI says matches what the server did."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RECORDS = [
    {"prompt": f"Word {i}:", "completion": f" {w}"}
    for i, w in enumerate(["amber", "basil", "cedar", "delta"])
]


def jobs_cli(
    server, *args: str, stdin: str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return jobs_cli_at(server.url, *args, stdin=stdin, timeout=timeout)


def jobs_cli_at(
    url: str, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_harli.jobs", "--url", url, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def completed_job(server, tmp_path_factory):
    """``submit spec.json --wait`` of a tiny job, run to the end."""
    spec = {
        "name": "cli-tiny",
        "dataset": {"records": RECORDS},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {"epochs": 2, "micro_batch_size": 2, "learning_rate": 1e-3, "max_seq_len": 32},
    }
    path = tmp_path_factory.mktemp("cli") / "spec.json"
    path.write_text(json.dumps(spec))
    return jobs_cli(server, "submit", str(path), "--wait")


@pytest.fixture(scope="module")
def cancelled_job(server, data_dir, completed_job):
    """``submit --name --data --epochs 1000`` (a job that would run for ages), then ``cancel``."""
    (data_dir / "cli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    submitted = jobs_cli(server, "submit", "--name", "cli-long", "--data", "cli.jsonl", "--epochs", "1000")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["spec"]["training"]["epochs"] == 1000
    cancelled = jobs_cli(server, "cancel", "cli-long")
    assert cancelled.returncode == 0, cancelled.stderr
    return cancelled


def test_submit_wait_follows_the_job_to_completion(server, completed_job):
    assert completed_job.returncode == 0, completed_job.stderr
    assert "completed" in completed_job.stdout
    assert "step 4/4" in completed_job.stdout and "lora_path=cli-tiny" in completed_job.stdout
    assert "4/4" in completed_job.stderr  # the progress bar went to stderr
    status = server.get("/harli/jobs/cli-tiny").json()
    assert status["state"] == "completed" and status["step"] == status["total_steps"] == 4
    assert status["spec"]["lora"]["r"] == 8 and status["published"][-1]["loaded"]


def test_submit_from_data_then_cancel(server, cancelled_job):
    assert json.loads(cancelled_job.stdout)["state"] == "cancelled"
    status = server.get("/harli/jobs/cli-long").json()
    assert status["state"] == "cancelled" and status["spec"]["dataset"]["path"] == "cli.jsonl"

    again = jobs_cli(server, "cancel", "cli-long")
    assert again.returncode == 2 and "already cancelled" in again.stderr
    followed = jobs_cli(server, "status", "cli-long", "--wait")
    assert followed.returncode == 1 and "cli-long: cancelled" in followed.stdout


def test_list_shows_every_job(server, completed_job, cancelled_job):
    table = jobs_cli(server, "list")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["cli-tiny"][1:3] == ["completed", "4/4"]
    assert rows["cli-long"][1] == "cancelled"
    raw = jobs_cli(server, "list", "--json")
    assert {"cli-tiny", "cli-long"} <= {job["name"] for job in json.loads(raw.stdout)}


def test_server_refusals_exit_2_with_the_servers_message(server):
    unknown = jobs_cli(server, "status", "nosuch")
    message = server.get("/harli/jobs/nosuch").json()["error"]
    assert unknown.returncode == 2 and unknown.stderr == f"error: {message}\n" and "nosuch" in message

    spec = {"name": "cli-big", "dataset": {"records": RECORDS}, "lora": {"r": 64}}
    too_big = jobs_cli(server, "submit", "-", stdin=json.dumps(spec))
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: lora.r: ")
    assert "Traceback" not in too_big.stderr
    assert server.get("/harli/jobs/cli-big").status_code == 404


def test_unreachable_server_gets_a_hint_not_a_traceback():
    result = jobs_cli_at("http://127.0.0.1:1", "list")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "--url" in result.stderr
