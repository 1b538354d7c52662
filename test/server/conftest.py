"""The servers several modules share: the default one (``server``; the soak and then the fuzzer go last on
it), one behind API keys (``keyed_server``), one where everything is small (``small_server``) and the
quickstart's own, on the real pretrained preset (``smollm2_server``).

A server start costs about 25 s, and a live server about 5 GB of memory (launcher, scheduler, detokenizer):
enough idle ones evict the page cache the next start reads its libraries from. So the modules that share a
server run one after another (``pytest_collection_modifyitems``), and each shared server stops after the
last test that uses it (``pytest_runtest_teardown``) rather than at the end of the session.

A start is mostly imports, on one core, so a shared server is launched while the tests before it run where
those tests are light and time nothing (``PRESTART``: the small server beside the keyed server's tests);
its fixture then only waits for it. Beside anything heavier (the engine-free tier, the lending burst, the
soak) the two slow each other down more than the overlap saves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.lending import lending_server
from helpers.servers import ADMIN_KEY, KEYED_MODEL_NAME, SERVER_ARGS, USER_KEY
from sglang_harli import quickstart
from sglang_harli.models.builtin import materialize
from sglang_harli.server_process import ServerProcess


def _server_launch(factory) -> ServerProcess:
    """The default main job: built-in tiny model, LoRA enabled on all target modules, finetuning on."""
    run_dir = factory.mktemp("server")
    args = [
        *SERVER_ARGS,
        "--enable-metrics",
        "--harli-kv-poison",  # every lent KV page is checked on return: decode never wrote it
        "--harli-data-dir", str(_dirs(factory)["data"]),
        "--harli-output-dir", str(run_dir / "adapters"),
    ]  # fmt: skip
    return ServerProcess(args, run_dir / "server.log")


def _keyed_launch(factory) -> ServerProcess:
    """A server behind SGLang's --api-key and --admin-api-key (``test_auth``), serving the tiny model under a
    name the Tinker cookbook knows, its state under --harli-state-dir (``test_tinker_cookbook``), with KV
    lending off, and a TTFT objective (``test_ttft``) so generous that every prefill arriving during
    finetune work beside decode may be held."""
    args = [
        "--model-path", str(materialize("tiny")), *SERVER_ARGS,
        "--served-model-name", KEYED_MODEL_NAME,
        "--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY,
        "--harli-state-dir", str(_dirs(factory)["keyed-state"]),
        "--harli-kv-lending", "off",  # the flag reaches the scheduler (test_auth); Tinker clients never lend
        "--harli-ttft-slo-ms", "60000",
    ]  # fmt: skip
    return ServerProcess(args, factory.mktemp("keyed") / "server.log")


def _small_launch(factory) -> ServerProcess:
    """Everything small: an 8,192-token KV pool and a 1 MiB trainer budget (``test_lending``), and request,
    dataset and queue limits (``test_limits``); its ``data_dir`` is its --harli-data-dir."""
    run = factory.mktemp("small")
    (run / "data").mkdir()
    limits = [
        "--harli-data-dir", str(run / "data"), "--harli-max-request-mb", "0.05",
        "--harli-max-dataset-mb", "0.01", "--harli-max-jobs", "2",
    ]  # fmt: skip
    srv = lending_server(run, *limits)
    srv.data_dir = run / "data"
    return srv


def _smollm2_launch(factory) -> ServerProcess:
    """``harli:smollm2-135m`` started as the quickstart starts it (``test_quickstart`` runs it with
    ``--url``, ``test_smollm2`` checks its tokens and trains it through the Tinker SDK)."""
    materialize("smollm2-135m")
    run = factory.mktemp("smollm2")
    args = quickstart.server_args(["--harli-output-dir", str(run / "adapters")])
    return ServerProcess(args, run / "server.log")


LAUNCH = {
    "keyed_server": _keyed_launch,
    "small_server": _small_launch,
    "server": _server_launch,
    "smollm2_server": _smollm2_launch,
}
SHARED = tuple(LAUNCH)
_STARTED: dict[str, ServerProcess] = {}  # shared servers launched (perhaps early), by fixture name
_DIRS: dict[str, Path] = {}


def _dirs(factory) -> dict[str, Path]:
    """Directories a shared server and the tests that use it agree on, made once."""
    if not _DIRS:
        _DIRS.update(data=factory.mktemp("data"), **{"keyed-state": factory.mktemp("keyed-state")})
    return _DIRS


def _launched(name: str, factory) -> ServerProcess:
    if name not in _STARTED:
        _STARTED[name] = LAUNCH[name](factory)
    return _STARTED[name]


def _shared(name: str, factory):
    with _launched(name, factory) as srv:
        _LIVE[name] = srv
        yield srv


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    yield from _shared("server", tmp_path_factory)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The default server's --harli-data-dir: finetune jobs may read dataset files from here."""
    return _dirs(tmp_path_factory)["data"]


@pytest.fixture(scope="session")
def keyed_state_dir(tmp_path_factory) -> Path:
    """The keyed server's --harli-state-dir (its Tinker saves land there)."""
    return _dirs(tmp_path_factory)["keyed-state"]


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory) -> ServerProcess:
    yield from _shared("keyed_server", tmp_path_factory)


@pytest.fixture(scope="session")
def small_server(tmp_path_factory) -> ServerProcess:
    yield from _shared("small_server", tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_dir():
    return materialize("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory) -> ServerProcess:
    yield from _shared("smollm2_server", tmp_path_factory)


_LIVE: dict[str, ServerProcess] = {}  # shared servers started, by fixture name
_LAST_USE: dict[str, str] = {}  # shared server -> node id of the last test that uses it
_FIRST_OF_GROUP: dict[str, int] = {}  # node id of a group's first test -> the group
PRESTART = {0: "small_server"}
"""When the first test of a group (``_group``) starts, the shared server launched beside it."""


def _uses(item: pytest.Item, name: str) -> bool:
    """Whether ``item`` uses the shared server ``name`` (a module's own fixture of that name, such as
    ``test_lending``'s ``server``, is not it)."""
    definitions = item._fixtureinfo.name2fixturedefs.get(name)
    return bool(definitions) and definitions[-1].func.__module__ == _uses.__module__


def _group(module: list[pytest.Item]) -> int:
    """Where a server module runs: by the shared servers it uses, so each server's users are adjacent (the
    keyed server's, the small one's, then the default one's, with the soak and then the fuzzer last on it,
    then the real preset's), then the modules that start servers of their own."""
    uses = {name for item in module for name in SHARED if _uses(item, name)}
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
    seen: set[int] = set()
    for item in items:
        for name in SHARED:
            if _uses(item, name):
                _LAST_USE[name] = item.nodeid
        group = rank(item)[0]
        if group >= 0 and group not in seen:
            seen.add(group)
            _FIRST_OF_GROUP[item.nodeid] = group


def _prestart(config, name: str) -> None:
    if name in _LAST_USE:  # some selected test uses it
        _launched(name, config._tmp_path_factory)


def pytest_runtest_setup(item) -> None:
    group = _FIRST_OF_GROUP.get(item.nodeid)
    if group in PRESTART:
        _prestart(item.config, PRESTART[group])


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """A shared server stops once the last test that uses it is done, after that test's own fixtures are
    torn down (its fixture's own stop, at the end of the session, then finds it stopped)."""
    for name, nodeid in _LAST_USE.items():
        if nodeid == item.nodeid and name in _LIVE:
            _LIVE.pop(name).stop()


def pytest_sessionfinish(session) -> None:
    """A server launched early that no test ended up waiting for stops with the session."""
    for srv in _STARTED.values():
        srv.stop()
