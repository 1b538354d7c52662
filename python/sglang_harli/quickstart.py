"""``python -m sglang_harli.quickstart``: start the server on the built-in model, ask it once, print, stop.

The first thing a new user runs: it proves the install works end to end (platform plugin, launcher,
Harli scheduler, SGLang's HTTP API) without downloading a model. Extra arguments go to the launcher.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from sglang_harli.server_process import ServerProcess

PROMPT = "The river town woke slowly on the first cold morning"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    log = Path(tempfile.gettempdir()) / "sglang-harli-quickstart.log"
    print(f"starting sglang_harli.launch_server {' '.join(args)} (log: {log}) ...", flush=True)
    with ServerProcess(args, log) as server:
        out = server.post(
            "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
        ).json()
        stats = server.get("/harli/stats").json()
    print(
        json.dumps({"prompt": PROMPT, "completion": out["text"], "output_ids": out["output_ids"]}, indent=2)
    )
    latency = stats["decode_step_latency"]
    print(f"decode steps: {stats['decode_steps']}, p50 step latency: {latency['p50_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
