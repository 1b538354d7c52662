"""``sglang_harli.core`` must run where SGLang cannot be installed (the GPU box, unit tests), and what
crosses a process boundary (``core.wire``) must not need torch, peft or transformers to be read."""

import subprocess
import sys

# Every module under sglang_harli.core (found with pkgutil, so a new one is covered without editing this
# test) is imported in a fresh interpreter; none may pull in the ``sglang`` package (``sglang_harli`` is
# ours and allowed).
CHECK = """
import importlib, pkgutil, sys
import sglang_harli.core
modules = [m.name for m in pkgutil.walk_packages(sglang_harli.core.__path__, "sglang_harli.core.")]
assert "sglang_harli.core.config" in modules and "sglang_harli.core.wire.stats" in modules, modules
for name in modules:
    importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
    assert not leaked, (name, leaked)
import sglang_harli.models.builtin
leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
assert not leaked, leaked
print("ok", len(modules))
"""


def test_core_imports_without_sglang():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("ok ")


def test_srt_does_import_sglang():
    """The check above can fail: the integration layer really does pull SGLang in."""
    code = "import sys, sglang_harli.srt.control; print('sglang' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr


# Every struct of a control message, and everything its fields are made of, imported in a fresh
# interpreter: not one of the heavy libraries is loaded. The test above the check is that it can fail.
WIRE = """
import sys
from sglang_harli.core.wire import control, memory, stats
assert len(control.CONTROL_REQUESTS) >= 14
heavy = sorted(m for m in ("torch", "peft", "transformers", "accelerate", "safetensors") if m in sys.modules)
print(heavy)
"""


def test_the_wire_types_import_neither_torch_nor_peft():
    out = subprocess.run([sys.executable, "-c", WIRE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_wire_check_can_fail():
    code = WIRE.replace(
        "from sglang_harli.core.wire import",
        "import torch\nfrom sglang_harli.core.wire import",
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout.strip().splitlines()[-1]
