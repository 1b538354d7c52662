import subprocess
import sys

import psutil
import torch

from sglang_harli.srt import platforms
from sglang_harli.srt.platforms.cpu import DEFAULT_CPU_MAX_TOTAL_TOKENS, HarliCpuPlatform


def test_selected_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert platforms.activate_cpu() == platforms.CPU_PLATFORM_CLASS


def test_never_activates_on_cuda_unless_named(monkeypatch):
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert platforms.activate_cpu() is None
    monkeypatch.setenv("SGLANG_PLATFORM", platforms.CPU_PLATFORM_NAME)
    assert platforms.activate_cpu() == platforms.CPU_PLATFORM_CLASS


def test_sglang_discovers_it_through_the_entry_point():
    code = (
        "from sglang.srt.platforms import current_platform as p; print(type(p).__name__, p.is_out_of_tree())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "HarliCpuPlatform True", out.stderr


def test_pinning_is_a_no_op_after_init_backend():
    code = """
import torch
from sglang_harli.srt.platforms.cpu import HarliCpuPlatform
try:
    torch.zeros(2, pin_memory=True)
    raise SystemExit("pinning unexpectedly worked before init_backend")
except RuntimeError:
    pass
HarliCpuPlatform().init_backend()
t = torch.tensor([1, 2], dtype=torch.int32, pin_memory=True)
assert t.pin_memory() is t and t.tolist() == [1, 2]
assert torch.empty(3, pin_memory=True).shape == (3,)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1:] == ["ok"], out.stderr


def test_memory_queries_are_bounded_by_the_machine():
    platform = HarliCpuPlatform()
    free, total = platform.get_available_memory()
    assert 0 < free <= total <= psutil.virtual_memory().total
    assert platform.get_current_memory_usage() >= 0


class _Args:
    attention_backend = None
    sampling_backend = None
    max_total_tokens = None


def test_defaults_fill_only_unset_fields():
    args = _Args()
    HarliCpuPlatform().apply_server_args_defaults(args)
    assert args.attention_backend == "torch_native"
    assert args.max_total_tokens == DEFAULT_CPU_MAX_TOTAL_TOKENS
    args = _Args()
    args.max_total_tokens = 1234
    args.attention_backend = "triton"
    HarliCpuPlatform().apply_server_args_defaults(args)
    assert args.max_total_tokens == 1234 and args.attention_backend == "triton"
