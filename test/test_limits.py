"""Bounded inputs: oversized bodies, datasets, sequence lengths and job counts are refused with a 4xx that
names the field and the flag, and job names can never address a path."""

import json

import pytest

from conftest import SERVER_ARGS
from sglang_harli.server_process import ServerProcess
from test_jobs import RECORDS, job_spec

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("limited")
    (run / "data").mkdir()
    args = [
        *SERVER_ARGS,
        "--harli-data-dir",
        str(run / "data"),
        "--harli-output-dir",
        str(run / "adapters"),
        "--harli-max-request-mb",
        "0.05",
        "--harli-max-dataset-mb",
        "0.01",
        "--harli-max-jobs",
        "2",
    ]
    with ServerProcess(args, run / "server.log") as srv:
        srv.data_dir = run / "data"
        yield srv


def refused(server, body, status, *needles, **kwargs):
    resp = server.post("/harli/jobs", body, **kwargs)
    assert resp.status_code == status, resp.text
    for needle in needles:
        assert needle in resp.text, resp.text
    return resp


def test_sizes_are_bounded_with_a_clear_error(limited):
    big = [{"prompt": "p" * 100, "completion": " c" * 100}] * 200  # ~60 KiB of JSON
    refused(limited, job_spec("big", {"records": big}), 413, "body", "--harli-max-request-mb")
    # Streamed without a length up front: still cut off at the limit.
    chunks = (
        json.dumps(job_spec("big", {"records": big})).encode()[i : i + 4096] for i in range(0, 70_000, 4096)
    )
    resp = limited.post("/harli/jobs", None, data=chunks, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text

    (limited.data_dir / "large.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS * 40))
    refused(limited, job_spec("file", {"path": "large.jsonl"}), 400, "dataset.path", "--harli-max-dataset-mb")

    too_long = job_spec("long", {"records": RECORDS[:2]}, max_seq_len=1 << 20)
    refused(limited, too_long, 400, "training.max_seq_len", "context length")


@pytest.mark.parametrize("name", ["../up", "a/b", "..", ".hidden", "a\\b", "x" * 65, "nul\u0000"])
def test_a_job_name_cannot_be_a_path(limited, name):
    refused(limited, job_spec(name, {"records": RECORDS[:2]}), 422, "name")


def test_a_symlink_cannot_carry_a_dataset_read_outside_the_data_dir(limited, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps(RECORDS[0]) + "\n")
    (limited.data_dir / "innocent.jsonl").symlink_to(secret)
    refused(limited, job_spec("sneaky", {"path": "innocent.jsonl"}), 400, "dataset.path", "outside")


def test_queued_jobs_are_bounded_and_a_slot_frees_when_one_ends(limited):
    for name in ("one", "two"):
        assert (
            limited.post("/harli/jobs", job_spec(name, {"records": RECORDS}, epochs=500)).status_code == 201
        )
    refused(limited, job_spec("three", {"records": RECORDS}), 429, "--harli-max-jobs")
    assert limited.post("/harli/jobs/one/cancel", {}).status_code == 200
    assert limited.post("/harli/jobs", job_spec("three", {"records": RECORDS}, epochs=500)).status_code == 201
    for name in ("two", "three"):
        assert limited.post(f"/harli/jobs/{name}/cancel", {}).status_code == 200
