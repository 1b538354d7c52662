"""Bad command lines fail fast: one line naming the flag, exit code 2, nothing left running; good ones reach
the config, and the CPU platform fills only what was not given; a fleet needs an admin key.

Every command line runs through the launcher in one child process (``helpers.launcher``): SGLang is
imported once, and none of its process-wide state reaches the other tests."""

import msgspec
import pytest

from helpers import launcher
from helpers.launcher import BAD_FLAGS, UNSERVABLE
from sglang_harli.core.config import HarliConfig
from sglang_harli.launch_server import PROG


def prefetch() -> None:
    """Start the child at the end of collection: SGLang's import overlaps the tests before this module's."""
    launcher.child()


@pytest.fixture(scope="module")
def outcomes():
    """Every case of this module, by name, and the processes the child left running."""
    found = launcher.report()
    return found["results"], found["spawned"]


@pytest.mark.parametrize("index", range(len(BAD_FLAGS)), ids=[flag for _, flag in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(outcomes, index):
    done, spawned = outcomes[0][f"bad {index}"], outcomes[1]
    flag = BAD_FLAGS[index][1]
    assert done["returncode"] == 2
    lines = done["stderr"].strip().splitlines()
    assert len(lines) == 1, done["stderr"]
    assert lines[0].startswith(f"{PROG}: error:") and flag in lines[0]
    assert spawned == []


def test_flags_reach_the_config_and_cpu_defaults_fill_unset_fields(outcomes, tiny_model_dir):
    prepared = outcomes[0]["flags"]
    args = prepared["args"]
    assert msgspec.convert(prepared["config"], HarliConfig) == HarliConfig(tpot_slo_ms=42.0)
    assert args["lora_backend"] == "torch_native"
    # The platform's defaults are SGLang resolutions: read them the way SGLang does.
    assert prepared["attention_backend"] == "torch_native"
    assert args["model_path"] == str(tiny_model_dir)
    assert args["served_model_name"] == "harli-tiny"
    assert args["device"] == "cpu" and args["dtype"] == "float32"
    assert args["sleep_on_idle"]  # an idle scheduler waits on its sockets instead of spinning a core

    explicit = outcomes[0]["explicit"]
    assert explicit["args"]["dtype"] == "bfloat16" and explicit["args"]["lora_backend"] == "triton"
    assert msgspec.convert(explicit["config"], HarliConfig) == HarliConfig()


@pytest.mark.parametrize("index", range(len(UNSERVABLE)))
def test_unservable_model_dirs_are_refused_naming_file_and_field(outcomes, index):
    message = outcomes[0][f"unservable {index}"]["error"]
    assert "\n" not in message and message.startswith("argument --model-path")
    assert all(word in message for word in UNSERVABLE[index][2]), message


def test_an_unservable_model_dir_stops_the_launcher_with_one_line(outcomes):
    done, spawned = outcomes[0]["unservable main"], outcomes[1]
    assert done["returncode"] == 2
    lines = done["stderr"].strip().splitlines()
    assert len(lines) == 1, done["stderr"]  # SGLang's registry warnings are silenced while it is read
    assert "config.json" in lines[0] and "NoSuchModelForCausalLM" in lines[0]
    assert spawned == []


def test_cpu_pd_decode_keeps_its_retraction_backup_in_plain_tensors(outcomes):
    assert outcomes[0]["pd decode"]["args"]["disaggregation_decode_retraction_backup"] == "cpu_tensor"


def test_the_launcher_refuses_a_fleet_without_an_admin_key(outcomes):
    results = outcomes[0]
    assert results["fleet without a key"]["error"].startswith("argument --harli-peers: needs --admin-api-key")
    assert results["fleet bad peer"]["error"].startswith("argument --harli-peers")
    assert results["fleet"]["config"]["peers"] == "http://10.0.0.2:30000"
