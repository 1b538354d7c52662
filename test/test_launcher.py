"""Bad command lines fail fast: one line naming the flag, exit code 2, nothing left running; good ones reach
the config, and the CPU platform fills only what was not given; a fleet needs an admin key.

Every command line runs through the launcher in one child process (``helpers.launcher``): SGLang is
imported once, and none of its process-wide state reaches the other tests."""

import json

import msgspec
import pytest

from helpers.fleet import KEY
from helpers.launcher import launched
from sglang_harli.core.config import HarliConfig
from sglang_harli.launch_server import PROG

LORA = ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all"]
BAD_FLAGS = [
    (["--no-such-flag"], "--no-such-flag"),
    (["--harli-no-such-thing", "1"], "--harli-no-such-thing"),
    (["--harli-tpot-slo-ms", "-5"], "--harli-tpot-slo-ms"),
    (["--harli-tpot-slo-ms", "fast"], "--harli-tpot-slo-ms"),
    (["--harli-slo-percentile", "101"], "--harli-slo-percentile"),
    (["--port", "http"], "--port"),
    (["--model-path", "harli:enormous"], "--model-path"),
]
UNSERVABLE = [
    ({"architectures": None}, None, ["config.json", "'architectures'"]),
    ({"architectures": ["NoSuchModelForCausalLM"]}, None, ["config.json", "NoSuchModelForCausalLM"]),
    ({}, "tokenizer.json,tokenizer_config.json", ["no tokenizer", "--tokenizer-path"]),
]


def _copy_model(src, dst, drop: str | None = None, **config_changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    for key in [k for k, v in config_changes.items() if v is None]:
        del config[key]
    (dst / "config.json").write_text(json.dumps(config))
    if drop:
        for name in drop.split(","):
            (dst / name).unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir, tmp_path_factory):
    """Every case of this module, run in one child process; by name."""
    root = tmp_path_factory.mktemp("models")
    unservable = [_copy_model(tiny_model_dir, root / f"m{i}", drop, **changes) for i, (changes, drop, _) in
                  enumerate(UNSERVABLE)]  # fmt: skip
    cases = {
        **{f"bad {i}": ("main", args) for i, (args, _) in enumerate(BAD_FLAGS)},
        "unservable main": ("main", ["--model-path", str(unservable[1])]),
        **{f"unservable {i}": ("prepare", ["--model-path", str(m)]) for i, m in enumerate(unservable)},
        "flags": ("prepare", ["--harli-tpot-slo-ms", "42", *LORA]),
        "explicit": (
            "prepare",
            ["--model-path", str(tiny_model_dir), "--dtype", "bfloat16", "--lora-backend", "triton", *LORA],
        ),
        "pd decode": (
            "prepare",
            ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "fake"],
        ),
        "fleet without a key": ("prepare", ["--harli-peers", "http://127.0.0.1:1"]),
        "fleet bad peer": ("prepare", ["--harli-peers", "nowhere", "--admin-api-key", KEY]),
        "fleet": ("prepare", ["--harli-peers", "http://10.0.0.2:30000", "--admin-api-key", KEY]),
    }
    results, spawned = launched(list(cases.values()))
    return dict(zip(cases, results, strict=True)), spawned


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
