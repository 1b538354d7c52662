"""The launcher's command-line handling, run for many command lines in one process of its own.

``prepare()`` resolves SGLang's server arguments, which imports SGLang and sets process-wide state that
later tests would inherit (once seen: a trainer comparison failing after it ran in the test process), and
each fresh process pays SGLang's import again. So ``launched`` runs every case in one child process:
``("prepare", argv)`` reports the resolved arguments or the usage error; ``("main", argv)`` runs the
launcher's ``main`` as ``python -m sglang_harli.launch_server`` would, with file descriptor 2 captured (so
SGLang's own warnings count as lines too) and with starting the server replaced by a refusal, so a command
line that should have failed can never start one. The child reports the processes it spawned.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, os, sys, tempfile
import msgspec, psutil
from sglang.srt.arg_groups.overrides import resolving_view
from sglang_harli import launch_server
from sglang_harli.launch_server import UsageError, prepare

def started(server_args):
    raise SystemExit("the launcher would have started a server")

launch_server.run = started

def simple(args):
    fields = msgspec.structs.asdict(args) if isinstance(args, msgspec.Struct) else vars(args)
    return {k: v for k, v in fields.items() if isinstance(v, (str, int, float, bool, type(None)))}

def main_with_stderr(argv):
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            code = launch_server.main(argv)
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return {"returncode": code, "stderr": captured.read().decode(errors="replace")}

results = []
for kind, argv in json.loads(sys.stdin.read()):
    if kind == "main":
        results.append(main_with_stderr(argv))
        continue
    try:
        args = prepare(argv)
    except UsageError as exc:
        results.append({"error": str(exc)})
        continue
    results.append({
        "args": simple(args),
        "config": msgspec.to_builtins(args._harli_config),
        "attention_backend": resolving_view(args).attention_backend,
    })
children = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print(json.dumps({"results": results, "spawned": children}))
"""


def launched(cases: list[tuple[str, list[str]]]) -> tuple[list[dict], list[str]]:
    """Each case's result (``prepare``: ``{"args", "config", "attention_backend"}`` or ``{"error"}``;
    ``main``: ``{"returncode", "stderr"}``), and the command lines of processes the child left running."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(cases), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["results"], report["spawned"]
