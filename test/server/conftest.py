"""The servers several modules share, one of each for the session: the default one (``server``; the fuzzer
goes last on it), one behind API keys (``keyed_server``) and one where everything is small
(``small_server``)."""

from __future__ import annotations

import pytest

from helpers.lending import lending_server
from helpers.servers import ADMIN_KEY, KEYED_MODEL_NAME, SERVER_ARGS, USER_KEY
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


@pytest.fixture(scope="session")
def keyed_state_dir(tmp_path_factory):
    """The keyed server's --harli-state-dir (its Tinker saves land there)."""
    return tmp_path_factory.mktemp("keyed-state")


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory, keyed_state_dir, tiny_model_dir) -> ServerProcess:
    """A server behind SGLang's --api-key and --admin-api-key (``test_auth``), serving the tiny model under a
    name the Tinker cookbook knows, its state under --harli-state-dir (``test_tinker_cookbook``)."""
    args = [
        *SERVER_ARGS,
        "--served-model-name", KEYED_MODEL_NAME,
        "--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY,
        "--harli-state-dir", str(keyed_state_dir),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with ServerProcess(["--model-path", str(tiny_model_dir), *args], log) as srv:
        yield srv


@pytest.fixture(scope="session")
def small_server(tmp_path_factory) -> ServerProcess:
    """Everything small: an 8,192-token KV pool and a 1 MiB trainer budget (``test_lending``), and request,
    dataset and queue limits (``test_limits``); its ``data_dir`` is its --harli-data-dir."""
    run = tmp_path_factory.mktemp("small")
    (run / "data").mkdir()
    limits = [
        "--harli-data-dir", str(run / "data"), "--harli-max-request-mb", "0.05",
        "--harli-max-dataset-mb", "0.01", "--harli-max-jobs", "2",
    ]  # fmt: skip
    with lending_server(run, *limits) as srv:
        srv.data_dir = run / "data"
        yield srv


def pytest_collection_modifyitems(items) -> None:
    """The API fuzzer runs after every other test: it leaves the shared server with what it created (jobs,
    Tinker sessions holding training-client places until they expire), which no other test should meet."""
    items.sort(key=lambda item: item.path.name == "test_fuzz_api.py")
