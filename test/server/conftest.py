"""The shared server: one real ``sglang_harli.launch_server`` for the session."""

from __future__ import annotations

import pytest

from helpers.servers import SERVER_ARGS
from sglang_harli.server_process import ServerProcess


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
