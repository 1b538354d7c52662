"""``benchmark.gpu`` at its tiny CPU shape: the code a lent GPU runs, kept running here so it cannot rot."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest
import torch
from benchmark import gpu, report, run
from benchmark.gpu.summary import gpu_summary

from helpers import background
from helpers.background import Background

ROOT = Path(__file__).resolve().parent.parent


def _smoke_child() -> Background:
    """One ``--smoke`` run, as CI and a developer without a GPU run it."""
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    command = [sys.executable, "-m", "benchmark.gpu", "--smoke", "--out", str(out_dir)]
    child = Background(command, cwd=ROOT, env=env)
    child.out_dir = out_dir
    return child


def prefetch() -> None:
    """Start the smoke run at the end of collection (``helpers.background``): it overlaps the tests before
    this module's, while the other background children yield it their CPU (it measures time)."""
    background.start("gpu smoke", _smoke_child)


@pytest.fixture(scope="module")
def smoke() -> tuple[Path, str]:
    """The smoke run's out dir and what it printed."""
    child = background.start("gpu smoke", _smoke_child)
    out = child.result(timeout=240)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    return child.out_dir, out.stdout


def test_smoke_run_reports_every_part(smoke):
    out_dir, printed = smoke
    result = json.loads((out_dir / "gpu.json").read_text())
    assert result["mode"] == "smoke" and result["device"]["type"] == "cpu"
    parts = result["parts"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(gpu.PARTS, "ok")
    assert "| part | status | seconds |" in printed  # the table printed last
    assert (out_dir / "gpu.log").read_text().count("==") >= 2 * len(gpu.PARTS)

    ceilings = parts["ceilings"]
    assert ceilings["matmul_tflops"] > 0 and ceilings["copy_gbps"] > 0

    trainer = parts["trainer"]
    assert trainer["ours_tokens_per_s"] > 0 and trainer["reference_tokens_per_s"] > 0
    assert math.isfinite(trainer["final_loss"]) and 0 < trainer["final_loss"] < 20
    assert trainer["flops_per_token"] > 0 and 0 < trainer["mfu"]  # against the measured CPU peak

    decode = parts["decode"]["rows"]
    assert all(row["step_ms"] > 0 for row in decode)
    for context in {row["context"] for row in decode}:
        steps = sorted((row["batch"], row["step_ms"]) for row in decode if row["context"] == context)
        assert len(steps) >= 3 and steps[-1][1] > steps[0][1], steps  # a 64-request step costs more than one

    corun = parts["corun"]
    assert [s["name"] for s in corun["splits"]] == ["shared"]
    beside = [row for row in corun["rows"] if row["split"] == "shared"]
    assert beside and all(row["finetune_tokens_per_s"] > 0 and row["interval_ms"] > 0 for row in beside)
    assert (
        corun["predictor"]["solo_mape"] is not None and corun["predictor"]["corun_mape"]["shared"] is not None
    )

    replay = parts["replay"]
    runs = {run["policy"]: run for run in replay["runs"]}
    assert set(runs) == set(gpu.POLICIES)
    assert replay["slo_ms"] > 0 and replay["requests"] > 0
    for policy in runs.values():
        assert 0.0 <= policy["slo_attainment"] <= 1.0 and policy["intervals"] > 0, policy
        assert 0.0 <= policy["itl_attainment"] <= 1.0 and policy["requests_finished"] > 0, policy
        assert policy["finetune_tokens_per_s"] >= 0
    assert runs["harli"]["finetune_tokens"] > 0
    assert runs["static"]["static_units"] == replay["static_units"]


def test_gpu_part_is_recorded_from_a_lent_machine(smoke, tmp_path):
    """What ``benchmark.run`` does with a GPU's run: its targets, and ``--merge`` of the run.json the
    device brought back (here the smoke's figures stand in for an H200's)."""
    out_dir, _ = smoke
    result = json.loads((out_dir / "gpu.json").read_text())
    targets, table, notes = gpu_summary(result, "NVIDIA H200")
    assert [t.verdict in ("met", "missed") for t in targets] == [True, True], targets
    assert targets[0].target.startswith("trainer MFU >= 45%") and "TFLOP/s" in targets[0].measured
    assert "1.46x" in targets[1].target and "harli attainment" in targets[1].measured
    assert "| policy |" in table and any("Replay:" in n for n in notes)
    not_run, _, _ = gpu_summary(None, "none")
    assert [t.verdict for t in not_run] == ["not run: no GPU lent"] * 2

    device = tmp_path / "device"  # the device tool's files_at: run.json and gpu.json side by side
    device.mkdir()
    (device / "gpu.json").write_bytes((out_dir / "gpu.json").read_bytes())
    record = report.PartRecord(
        part="gpu", status="ok", command="python -m benchmark.run --only gpu --out /tmp/out", mode="full",
        seed=0, started_utc="now", seconds=1.0, estimated_s=390.0, result_json="/tmp/out/gpu.json",
        machine=report.Machine(
            cpu="x", cores=16, memory_gib=128, gpu="NVIDIA H200", python="3.12", torch="2.11", sglang="-",
            transformers="5", peft="0.1",
        ),
        targets=targets, table=table, notes=notes,
    )  # fmt: skip
    report.save_manifest(device / "run.json", report.Manifest(parts={"gpu": record}))
    results = tmp_path / "results"
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n")
    argv = ["--merge", str(device / "run.json"), "--out", str(results), "--results-md", str(results_md)]
    assert run.main(argv) == 0
    merged = msgspec.json.decode((results / "run.json").read_bytes(), type=report.Manifest).parts["gpu"]
    assert merged.machine.gpu == "NVIDIA H200" and Path(merged.result_json).name == "gpu.json"
    assert (results / "gpu.json").read_bytes() == (out_dir / "gpu.json").read_bytes()
    assert "### GPU co-location and trainer MFU" in results_md.read_text()


def test_the_package_imports_nothing_but_torch():
    """The GPU machine has no msgspec: ``benchmark.gpu`` imports ``sglang_harli.core`` (which needs it)
    only when a part starts, and its summary (``benchmark.report``) only where ``benchmark.run`` asks."""
    probe = (
        "import sys, benchmark.gpu; "
        "print([m for m in ('msgspec', 'sglang_harli', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def _cached(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers 5
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def test_decode_stand_in_is_the_model_step():
    """The stand-in's step over a cache filled by transformers' own prefill gives transformers' logits."""
    base = gpu.Base(gpu.TINY, torch.device("cpu"), torch.float32, seed=0)
    model = base.bound_model()
    batch, context = 3, 21
    ids = torch.randint(8, gpu.TINY.vocab, (batch, context), generator=torch.Generator().manual_seed(1))
    decoder = gpu.Decoder(base, max_batch=4, max_context=32)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        for layer in range(gpu.TINY.layers):
            keys, values = _cached(cache, layer)  # [batch, kv heads, context - 1, head dim]
            decoder.keys[layer, :batch, : context - 1] = keys.transpose(1, 2)
            decoder.values[layer, :batch, : context - 1] = values.transpose(1, 2)
        decoder.ids[:batch] = ids[:, -1]
        logits = decoder.forward(batch, context, *decoder.rope(context - 1))
        expected = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(decoder.ids[:batch], expected.argmax(-1))
