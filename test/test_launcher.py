"""Bad command lines fail fast: one line naming the flag, exit code 2, nothing left running."""

import subprocess
import sys

import psutil
import pytest
from sglang.srt.arg_groups.overrides import resolving_view

from sglang_harli.core.config import HarliConfig
from sglang_harli.launch_server import PROG, UsageError, prepare


def _launch(*args: str):
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run(
        [sys.executable, "-m", "sglang_harli.launch_server", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    spawned = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and "sglang" in " ".join(p.info["cmdline"] or [])
    ]
    return out, spawned


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--no-such-flag"], "--no-such-flag"),
        (["--harli-no-such-thing", "1"], "--harli-no-such-thing"),
        (["--harli-tpot-slo-ms", "-5"], "--harli-tpot-slo-ms"),
        (["--harli-tpot-slo-ms", "fast"], "--harli-tpot-slo-ms"),
        (["--harli-slo-percentile", "101"], "--harli-slo-percentile"),
        (["--port", "http"], "--port"),
        (["--model-path", "harli:enormous"], "--model-path"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, flag):
    out, spawned = _launch(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{PROG}: error:") and flag in lines[0]
    assert spawned == []


def test_flags_reach_the_config_and_cpu_defaults_fill_unset_fields(tiny_model_dir):
    lora = ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all"]
    args = prepare(["--harli-tpot-slo-ms", "42", *lora])
    assert args._harli_config == HarliConfig(tpot_slo_ms=42.0)
    assert args.lora_backend == "torch_native"
    # The platform's defaults are SGLang resolutions: read them the way SGLang does.
    assert resolving_view(args).attention_backend == "torch_native"
    assert args.model_path == str(tiny_model_dir)
    assert args.served_model_name == "harli-tiny"
    assert args.device == "cpu" and args.dtype == "float32"
    assert args.sleep_on_idle  # an idle scheduler waits on its sockets instead of spinning a core

    explicit = prepare(
        ["--model-path", str(tiny_model_dir), "--dtype", "bfloat16", "--lora-backend", "triton", *lora]
    )
    assert explicit.dtype == "bfloat16" and explicit.lora_backend == "triton"
    assert explicit._harli_config == HarliConfig()


def _copy_model(src, dst, drop: str | None = None, **config_changes):
    import json
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


@pytest.mark.parametrize(
    "changes, drop, words",
    [
        ({"architectures": None}, None, ["config.json", "'architectures'"]),
        ({"architectures": ["NoSuchModelForCausalLM"]}, None, ["config.json", "NoSuchModelForCausalLM"]),
        ({}, "tokenizer.json,tokenizer_config.json", ["no tokenizer", "--tokenizer-path"]),
    ],
)
def test_unservable_model_dirs_are_refused_naming_file_and_field(
    tiny_model_dir, tmp_path, changes, drop, words
):
    model = _copy_model(tiny_model_dir, tmp_path / "model", drop, **changes)
    with pytest.raises(UsageError) as refused:
        prepare(["--model-path", str(model)])
    message = str(refused.value)
    assert "\n" not in message and message.startswith("argument --model-path")
    assert all(word in message for word in words), message


def test_an_unservable_model_dir_stops_the_launcher_with_one_line(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "model", None, architectures=["NoSuchModelForCausalLM"])
    out, spawned = _launch("--model-path", str(model))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # SGLang's registry warnings are silenced while it is read
    assert "config.json" in lines[0] and "NoSuchModelForCausalLM" in lines[0]
    assert spawned == []


def test_cpu_pd_decode_keeps_its_retraction_backup_in_plain_tensors():
    args = prepare(["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "fake"])
    assert args.disaggregation_decode_retraction_backup == "cpu_tensor"
