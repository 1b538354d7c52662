"""``sglang_harli.core`` must run where SGLang cannot be installed (the GPU box, unit tests)."""

import subprocess
import sys

CHECK = """
import sys
import sglang_harli.core, sglang_harli.core.config, sglang_harli.core.stats
import sglang_harli.models.builtin
leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
assert not leaked, leaked
print("ok")
"""


def test_core_imports_without_sglang():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_srt_does_import_sglang():
    """The check above can fail: the integration layer really does pull SGLang in."""
    code = "import sys, sglang_harli.srt.control; print('sglang' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr
