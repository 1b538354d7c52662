"""Shared fixtures: the built-in tiny checkpoint and one real ``sglang_harli.launch_server`` per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_harli.models.builtin import materialize
from sglang_harli.server_process import ServerProcess

SERVER_ARGS = [
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--lora-target-modules",
    "all",
    "--max-loras-per-batch",
    "4",
]


# A PD-disaggregated decode instance with no prefill instance: SGLang's fake transfer backend, and requests
# carrying FAKE_BOOTSTRAP (SGLang's FAKE_BOOTSTRAP_HOST) and a bootstrap_room.
PD_DECODE_ARGS = [
    "--disaggregation-mode",
    "decode",
    "--disaggregation-transfer-backend",
    "fake",
    "--disaggregation-decode-retraction-backup",
    "cpu_tensor",
]
FAKE_BOOTSTRAP = {"bootstrap_host": "2.2.2.2", "bootstrap_port": 8998}


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return materialize("tiny")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The server's --harli-data-dir: finetune jobs may read dataset files from here."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, data_dir) -> ServerProcess:
    """The default main job: built-in tiny model, LoRA enabled on all target modules, finetuning on."""
    run_dir = tmp_path_factory.mktemp("server")
    args = [
        *SERVER_ARGS,
        "--enable-metrics",
        "--harli-kv-poison",  # every lent KV page is checked on return: decode never wrote it
        "--harli-data-dir",
        str(data_dir),
        "--harli-output-dir",
        str(run_dir / "adapters"),
    ]
    with ServerProcess(args, run_dir / "server.log") as srv:
        yield srv
