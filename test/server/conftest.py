"""The servers several modules share: the default one (``server``; the soak and then the fuzzer go last on
it), one behind API keys (``keyed_server``), one where everything is small (``small_server``) and the
quickstart's own, on the real pretrained preset (``smollm2_server``).

A server start costs about 25 s, and a live server about 5 GB of memory (launcher, scheduler, detokenizer):
enough idle ones evict the page cache the next start reads its libraries from. So the modules that share a
server run one after another (``pytest_collection_modifyitems``), and each shared server stops after the
last test that uses it (``pytest_runtest_teardown``) rather than at the end of the session.
"""

from __future__ import annotations

import pytest

from helpers.lending import lending_server
from helpers.servers import ADMIN_KEY, KEYED_MODEL_NAME, SERVER_ARGS, USER_KEY
from sglang_harli import quickstart
from sglang_harli.models.builtin import materialize
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
        _LIVE["server"] = srv
        yield srv


@pytest.fixture(scope="session")
def keyed_state_dir(tmp_path_factory):
    """The keyed server's --harli-state-dir (its Tinker saves land there)."""
    return tmp_path_factory.mktemp("keyed-state")


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory, keyed_state_dir, tiny_model_dir) -> ServerProcess:
    """A server behind SGLang's --api-key and --admin-api-key (``test_auth``), serving the tiny model under a
    name the Tinker cookbook knows, its state under --harli-state-dir (``test_tinker_cookbook``), with KV
    lending off."""
    args = [
        *SERVER_ARGS,
        "--served-model-name", KEYED_MODEL_NAME,
        "--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY,
        "--harli-state-dir", str(keyed_state_dir),
        "--harli-kv-lending", "off",  # the flag reaches the scheduler (test_auth); Tinker clients never lend
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with ServerProcess(["--model-path", str(tiny_model_dir), *args], log) as srv:
        _LIVE["keyed_server"] = srv
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
        _LIVE["small_server"] = srv
        yield srv


@pytest.fixture(scope="session")
def smollm2_dir():
    return materialize("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir, tmp_path_factory) -> ServerProcess:
    """``harli:smollm2-135m`` started as the quickstart starts it (``test_quickstart`` runs it with
    ``--url``, ``test_smollm2`` checks its tokens and trains it through the Tinker SDK)."""
    run = tmp_path_factory.mktemp("smollm2")
    args = quickstart.server_args(["--harli-output-dir", str(run / "adapters")])
    with ServerProcess(args, run / "server.log") as srv:
        _LIVE["smollm2_server"] = srv
        yield srv


SHARED = ("keyed_server", "small_server", "server", "smollm2_server")
_LIVE: dict[str, ServerProcess] = {}  # shared servers started, by fixture name
_LAST_USE: dict[str, str] = {}  # shared server -> node id of the last test that uses it


def _group(module: list[pytest.Item]) -> int:
    """Where a server module runs: by the shared servers it uses, so each server's users are adjacent (the
    keyed server's, the small one's, then the default one's, with the soak and then the fuzzer last on it,
    then the real preset's), then the modules that start servers of their own."""
    uses = set().union(*(set(item.fixturenames) & set(SHARED) for item in module))
    if "keyed_server" in uses:
        return 0
    if "small_server" in uses:
        return 1 if "server" not in uses else 2
    if "server" in uses:
        return {"test_soak.py": 4, "test_fuzz_api.py": 5}.get(module[0].path.name, 3)
    if "smollm2_server" in uses:
        return 6
    return 7


def pytest_collection_modifyitems(items) -> None:
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.parent.name != "server":
            # The engine-free tier first, in its order, but the modules whose children run in the
            # background (``helpers.background``) at its end, when those children have had time to finish.
            return (-1, int(hasattr(getattr(item, "module", None), "prefetch")))
        return (_group(modules[str(item.path)]), 0)

    items.sort(key=rank)  # stable: within a group, modules and tests keep pytest's order
    for item in items:
        for name in set(item.fixturenames) & set(SHARED):
            _LAST_USE[name] = item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """A shared server stops once the last test that uses it is done, after that test's own fixtures are
    torn down (its fixture's own stop, at the end of the session, then finds it stopped)."""
    for name, nodeid in _LAST_USE.items():
        if nodeid == item.nodeid and name in _LIVE:
            _LIVE.pop(name).stop()
