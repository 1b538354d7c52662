import psutil
import pytest
import torch

from helpers import launcher
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


def prefetch() -> None:
    """The platform is probed by the one SGLang child (``helpers.launcher``), started at the end of
    collection."""
    launcher.child()


@pytest.fixture(scope="module")
def child():
    """A fresh interpreter's view of the platform (pinning before and after it initialises; SGLang
    resolving its platform on first import)."""
    return launcher.report()


def test_sglang_discovers_it_through_the_entry_point(child):
    assert child["platform"] == ["HarliCpuPlatform", True]


def test_pinning_is_a_no_op_after_init_backend(child):
    assert child["pinning"] == "ok"


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
