"""``sglang_harli.core`` must run where SGLang cannot be installed (the GPU box, unit tests), and what
crosses a process boundary (``core.wire``) must not need torch, peft or transformers to be read."""

import os
import subprocess
import sys

from helpers import background
from helpers.background import Background

# Every module under a package (sglang_harli.core by default; found with pkgutil, so a new one is covered
# without editing this test) is imported in a fresh interpreter; none may pull in the ``sglang`` package
# (``sglang_harli`` is ours and allowed).
CHECK = """
import importlib, pkgutil, sys
root = sys.argv[1] if len(sys.argv) > 1 else "sglang_harli.core"
package = importlib.import_module(root)
modules = [m.name for m in pkgutil.walk_packages(package.__path__, root + ".")]
for name in modules:
    importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
    assert not leaked, (name, leaked)
if root == "sglang_harli.core":
    assert "sglang_harli.core.config" in modules and "sglang_harli.core.wire.stats" in modules, modules
    import sglang_harli.models.builtin
    leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
    assert not leaked, leaked
print("ok", len(modules))
"""


def _check_core() -> Background:
    return Background([sys.executable, "-c", CHECK], yielding=True)


def prefetch() -> None:
    """Start the whole-core check at the end of collection (``helpers.background``)."""
    background.start("core isolation", _check_core)


def test_core_imports_without_sglang():
    out = background.start("core isolation", _check_core).result(timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("ok ")


def test_the_check_can_fail(tmp_path):
    """A module that imports ``sglang`` is caught, named: here a package of two modules, one of which imports
    a stand-in ``sglang`` (an empty package first on the path, so the check costs no SGLang import)."""
    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "__init__.py").write_text("")
    (tmp_path / "planted" / "clean.py").write_text("import json\n")
    (tmp_path / "planted" / "leaky.py").write_text("import sglang\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, "planted"], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode != 0
    assert "AssertionError: ('planted.leaky', ['sglang'])" in out.stderr, out.stderr


def test_srt_does_import_sglang():
    """The integration layer really does pull SGLang in (read from its source: importing it costs ~10 s)."""
    import ast
    from pathlib import Path

    import sglang_harli

    imported = set()
    for path in (Path(sglang_harli.__path__[0]) / "srt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
    assert "sglang" in imported


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


def test_the_wire_check_can_fail(tmp_path):
    """A wire module that imported torch would be caught (a stand-in ``torch`` first on the path: the check
    costs no torch import)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = WIRE.replace(
        "from sglang_harli.core.wire import", "import torch\nfrom sglang_harli.core.wire import"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['torch']"
