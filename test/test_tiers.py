"""The test tiers hold: a test outside ``test/server/`` that starts a server fails, naming itself, before
any server process exists; one inside is marked ``server`` and may (``helpers.tiers``)."""

import sys

import pytest

pytest_plugins = ["pytester"]

STARTS_A_SERVER = """
from sglang_harli.server_process import ServerProcess

def test_starts_one(tmp_path):
    ServerProcess(["--model-path", "/nonexistent"], tmp_path / "server.log").stop()
"""


@pytest.fixture
def suite(pytester):
    pytester.syspathinsert(str(pytester.path))
    pytester.makeconftest("pytest_plugins = ['helpers.tiers']")
    return pytester


def test_a_server_started_outside_the_server_tier_fails_the_test(suite):
    suite.makepyfile(test_engine_free=STARTS_A_SERVER)
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_starts_one starts a server but is not in the server tier*"])


def test_a_test_under_server_is_marked_and_may_start_one(suite):
    (suite.path / "server").mkdir()
    (suite.path / "server" / "test_tier.py").write_text(
        "import pytest\n\ndef test_marked(request):\n    assert request.node.get_closest_marker('server')\n"
    )
    suite.makepyfile(
        test_free="def test_free(request):\n    assert not request.node.get_closest_marker('server')\n"
    )
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", "-m", "not server")
    result.assert_outcomes(passed=1, deselected=1)
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_only_server_modules_count():
    from helpers.tiers import starts_server

    python = sys.executable
    assert starts_server([python, "-m", "sglang_harli.launch_server", "--port", "1"])
    assert starts_server([python, "-m", "sglang_harli.quickstart"])
    assert not starts_server([python, "-m", "sglang_harli.jobs", "list"])
    assert not starts_server([python, "-c", "import sglang_harli.launch_server"])


def test_the_guard_outlives_a_session_run_inside_this_one(suite):
    import subprocess

    from helpers.tiers import _guarded_init

    suite.makepyfile(test_free="def test_free():\n    pass\n")
    suite.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert subprocess.Popen.__init__ is _guarded_init
