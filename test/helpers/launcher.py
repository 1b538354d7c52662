"""What needs SGLang imported afresh, in one child process: the launcher's command lines and the CPU platform.

``prepare()`` resolves SGLang's server arguments, which imports SGLang and sets process-wide state that
later tests would inherit (once seen: a trainer comparison failing after it ran in the test process), and
each fresh process pays SGLang's import again (about 12 s here). So one child (``child``: started in the
background at the end of collection, ``helpers.background``) first probes the CPU platform as a fresh
interpreter sees it (``test_platform``), then runs every command line of ``test_launcher``:
``("prepare", argv)`` reports the resolved arguments or the usage error; ``("main", argv)`` runs the
launcher's ``main`` as ``python -m sglang_harli.launch_server`` would, with file descriptor 2 captured (so
SGLang's own warnings count as lines too) and with starting the server replaced by a refusal, so a command
line that should have failed can never start one. The child reports the processes it spawned.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from helpers import background
from helpers.background import Background
from helpers.fleet import KEY
from sglang_harli.models.builtin import materialize

LORA = ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all"]
BAD_FLAGS = [
    (["--no-such-flag"], "--no-such-flag"),
    (["--harli-no-such-thing", "1"], "--harli-no-such-thing"),
    (["--harli-tpot-slo-ms", "-5"], "--harli-tpot-slo-ms"),
    (["--harli-tpot-slo-ms", "fast"], "--harli-tpot-slo-ms"),
    (["--harli-slo-percentile", "101"], "--harli-slo-percentile"),
    (["--port", "http"], "--port"),
    (["--model-path", "harli:enormous"], "--model-path"),
]
"""Each bad command line, and the flag its one-line error must name."""
UNSERVABLE = [
    ({"architectures": None}, None, ["config.json", "'architectures'"]),
    ({"architectures": ["NoSuchModelForCausalLM"]}, None, ["config.json", "NoSuchModelForCausalLM"]),
    ({}, "tokenizer.json,tokenizer_config.json", ["no tokenizer", "--tokenizer-path"]),
]
"""Model directories SGLang could not serve: config changes, files dropped, words the refusal must say."""


_CHILD = r"""
import json, os, sys, tempfile
import msgspec, psutil, torch

# The CPU platform, in a fresh interpreter before anything of SGLang initialises it: pinning fails, then is a
# no-op once the platform's backend is up; and SGLang finds the platform through its entry point.
from sglang_harli.srt.platforms.cpu import HarliCpuPlatform
try:
    torch.zeros(2, pin_memory=True)
    pinning = "pinning unexpectedly worked before init_backend"
except RuntimeError:
    HarliCpuPlatform().init_backend()
    t = torch.tensor([1, 2], dtype=torch.int32, pin_memory=True)
    ok = t.pin_memory() is t and t.tolist() == [1, 2] and torch.empty(3, pin_memory=True).shape == (3,)
    pinning = "ok" if ok else "pinning is not a no-op after init_backend"
from sglang.srt.platforms import current_platform
platform = [type(current_platform).__name__, current_platform.is_out_of_tree()]
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
for kind, argv in json.loads(sys.argv[1]):
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
print(json.dumps({"results": results, "spawned": children, "pinning": pinning, "platform": platform}))
"""


def _copy_model(src, dst, drop: str | None = None, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    for key in [k for k, v in config_changes.items() if v is None]:
        del config[key]
    (dst / "config.json").write_text(json.dumps(config))
    if drop:
        for name in drop.split(","):
            (dst / name).unlink(missing_ok=True)
    return dst


def cases() -> dict[str, tuple[str, list[str]]]:
    """Every command line the child runs, by name."""
    tiny_model_dir = materialize("tiny")
    root = Path(tempfile.mkdtemp(prefix="launcher-models-"))
    unservable = [
        _copy_model(tiny_model_dir, root / f"m{i}", drop, **changes)
        for i, (changes, drop, _) in enumerate(UNSERVABLE)
    ]
    return {
        **{f"bad {i}": ("main", args) for i, (args, _) in enumerate(BAD_FLAGS)},
        "unservable main": ("main", ["--model-path", str(unservable[1])]),
        **{f"unservable {i}": ("prepare", ["--model-path", str(m)]) for i, m in enumerate(unservable)},
        "flags": ("prepare", ["--harli-tpot-slo-ms", "42", *LORA]),
        "explicit": (
            "prepare",
            ["--model-path", str(tiny_model_dir), "--dtype", "bfloat16", "--lora-backend", "triton", *LORA],
        ),
        "pd decode": (
            "prepare",
            ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "fake"],
        ),
        "fleet without a key": ("prepare", ["--harli-peers", "http://127.0.0.1:1"]),
        "fleet bad peer": ("prepare", ["--harli-peers", "nowhere", "--admin-api-key", KEY]),
        "fleet": ("prepare", ["--harli-peers", "http://10.0.0.2:30000", "--admin-api-key", KEY]),
    }


def _start() -> Background:
    named = cases()
    started = Background([sys.executable, "-c", _CHILD, json.dumps(list(named.values()))], yielding=True)
    started.names = list(named)
    return started


def child() -> Background:
    """The one child, started on first use (``prefetch``, at the end of collection, is the first use)."""
    return background.start("sglang child", _start)


def report() -> dict:
    """What the child found: ``results`` by case name (``prepare``: ``{"args", "config",
    "attention_backend"}`` or ``{"error"}``; ``main``: ``{"returncode", "stderr"}``), ``spawned`` (the
    command lines of processes it left running), ``pinning`` and ``platform``."""
    started = child()
    done = started.result(timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    found["results"] = dict(zip(started.names, found["results"], strict=True))
    return found
