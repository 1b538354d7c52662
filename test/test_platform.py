import subprocess
import sys

import psutil
import pytest
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


# Both checks in one child process: each needs a fresh interpreter (pinning before and after the platform
# initialises; SGLang resolving its platform on first import), and each start imports torch and SGLang.
CHILD = """
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
print("pinning ok")
from sglang.srt.platforms import current_platform as p
print(type(p).__name__, p.is_out_of_tree())
"""


@pytest.fixture(scope="module")
def child():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_sglang_discovers_it_through_the_entry_point(child):
    assert child[-1] == "HarliCpuPlatform True"


def test_pinning_is_a_no_op_after_init_backend(child):
    assert "pinning ok" in child


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
