"""Bounded inputs: oversized bodies (``/harli`` and ``/api/v1``, zstd or not), datasets, sequence lengths and
job counts are refused with a 4xx that names the field and the flag, and job names can never address a
path."""

import json

import numpy as np
import pytest
import requests
import tinker
from tinker import types

from helpers.bodies import PeakRss, json_filler, post_stream, zstd_bomb
from helpers.jobs import RECORDS, job_spec

pytestmark = pytest.mark.server


@pytest.fixture
def limited(small_server):
    """The shared small server (``conftest.py``): 0.05 MiB requests, 0.01 MiB datasets, 2 queued jobs."""
    return small_server


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


# -- the /api/v1 door: the same bound, before and after zstd, and no memory given to what it refuses ------

GIB = 1 << 30
GROWTH_MIB = 200  # the default limit is 64 MiB: a body is held up to that, never up to its own size


def _refused_body(status: int, answer: dict, *needles: str) -> None:
    assert status == 413 and answer["field"] == "body", (status, answer)
    for needle in needles:
        assert needle in answer["error"], answer


def test_api_v1_refuses_a_gib_json_body_and_a_zstd_bomb_without_holding_them(server):
    """On the shared server (default --harli-max-request-mb 64): 1 GiB of JSON, announced and streamed,
    and 96 KiB of zstd that inflate to 3 GiB (the frame declaring it, or not) are each refused with 413
    naming ``body``, while the server's processes grow by far less than any of them."""
    pid = server.proc.pid
    with PeakRss(pid) as announced:
        _refused_body(
            *post_stream(server.url, "/api/v1/create_model", json_filler(GIB), length=GIB), "64 MiB"
        )
    with PeakRss(pid) as streamed:  # no Content-Length: cut off while it streams in
        _refused_body(*post_stream(server.url, "/api/v1/create_model", json_filler(GIB)), "64 MiB")
    zstd = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    for declare, needle in ((True, "declares a content size"), (False, "inflates larger")):
        bomb = zstd_bomb(3 * GIB, declare=declare)
        assert len(bomb) < 100_000
        with PeakRss(pid) as inflated:
            status, answer = post_stream(
                server.url, "/api/v1/forward_backward", [bomb], length=len(bomb), headers=zstd
            )
        _refused_body(status, answer, needle, "--harli-max-request-mb")
        assert inflated.growth < GROWTH_MIB << 20, (declare, inflated.growth >> 20)
    assert announced.growth < GROWTH_MIB << 20, announced.growth >> 20
    assert streamed.growth < GROWTH_MIB << 20, streamed.growth >> 20
    assert server.get("/health").status_code == 200


def test_api_v1_bodies_follow_the_request_limit_and_the_sdk_is_told_to_fit(limited, tiny_model_dir):
    """With --harli-max-request-mb 0.05: a JSON body or a zstd one that inflates past 50 KiB is refused,
    the SDK is told to cut forward_backward into chunks of half that (compressed with zstd), and so a
    batch several times the limit still trains through the SDK."""
    big = {"session_id": "sess-1", "model_seq_id": 0, "pad": "x" * 60_000}
    response = limited.post("/api/v1/create_model", big)
    assert response.status_code == 413 and response.json()["field"] == "body", response.text
    assert "--harli-max-request-mb" in response.json()["error"]
    bomb = zstd_bomb(1 << 20, declare=False)
    zstd = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    response = requests.post(f"{limited.url}/api/v1/forward_backward", data=bomb, headers=zstd, timeout=30)
    assert response.status_code == 413 and "inflates larger" in response.json()["error"], response.text
    flags = limited.post("/api/v1/client/config", {"sdk_version": tinker.__version__}).json()
    assert flags == {"proto_compress_fwdbwd": True, "fwdbwd_max_chunk_bytes_count": int(0.05 * 2**20) // 2}

    with tinker.ServiceClient(base_url=limited.url, api_key="tml-harli") as service:
        training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
        rng = np.random.default_rng(0)
        datums = []
        for _ in range(6):  # ~20 KB each as the SDK estimates it: 120 KB in all, past the 52 KB limit
            tokens = rng.integers(3, 200, size=1201).tolist()
            datums.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 1200},
                )
            )
        out = training.forward_backward(datums, "cross_entropy").result()
    assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [1200] * 6
