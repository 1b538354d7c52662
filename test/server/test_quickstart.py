"""The README's first command works: a real model learns new facts and keeps what it knew. It runs against
the server the quickstart would start (``smollm2_server``, started with ``quickstart.server_args()``),
through ``--url``, so the real preset starts once for this and ``test_smollm2``."""

import re
import subprocess
import sys


def test_quickstart_learns_the_facts_and_keeps_general_knowledge(smollm2_server):
    command = [sys.executable, "-m", "sglang_harli.quickstart", "--url", smollm2_server.url]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    counts = re.search(r"learnt (\d+)/8, kept (\d+)/(\d+)", proc.stdout)
    assert counts, proc.stdout
    learnt, kept, base_knew = map(int, counts.groups())
    assert base_knew == 8, proc.stdout  # the base model answers every built-in probe right
    # Measured 8/8 and 8/8 (benchmark/RESULTS.md); one answer of slack for float noise across batchings.
    assert learnt >= 7 and kept >= 7, proc.stdout
    assert "retention kept" in proc.stdout  # the job scored itself while it trained
    assert "(+18 rehearsal answers)" in proc.stdout  # the preset's built-in set, answered by the base model
    assert "'shared_with_server': 273" in proc.stdout
