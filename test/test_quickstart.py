"""The README's first command works: serve, finetune over HTTP, serve the trained adapter."""

import re
import subprocess
import sys


def test_quickstart_learns_its_facts(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_harli.quickstart"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    learnt = re.search(r"learnt (\d+)/8 facts", proc.stdout)
    assert learnt and int(learnt.group(1)) >= 7, proc.stdout
    assert "'shared_with_server': 39" in proc.stdout
