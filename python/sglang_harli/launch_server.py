"""``python -m sglang_harli.launch_server``: SGLang's server, with Harli's scheduler and routes.

Takes every ``sglang.launch_server`` flag plus the ``--harli-*`` flags of ``HarliConfig``. On a machine
served by our CPU platform it also fills the CPU defaults that the user left unset. It then starts SGLang's
own HTTP server with ``HarliScheduler`` as the scheduler process, so everything SGLang serves (``/generate``,
``/v1/*``, LoRA hot-loading, metrics) works unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import msgspec

from sglang_harli.core.config import HarliConfig, add_struct_flags, flag_name, struct_from_flags
from sglang_harli.models.builtin import (
    DEFAULT_PRESET,
    PRESET_SCHEME,
    describe_presets,
    is_preset_path,
    resolve_model_path,
)

PROG = "sglang_harli.launch_server"
HARLI_DEST = "harli_"  # argparse destinations of the --harli-* flags: harli_<HarliConfig field>


class UsageError(Exception):
    """A bad command line: reported as one line on stderr, exit code 2, before any process is started."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line naming the flag instead of SGLang's several-hundred-line usage."""

    def error(self, message: str):
        raise UsageError(message)


def _add_harli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Harli", "Co-located finetuning (sglang-harli).")
    add_struct_flags(group, HarliConfig, flag=flag_name, dest_prefix=HARLI_DEST)


def build_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = _OneLineParser(
        prog=PROG,
        description=__doc__.splitlines()[0]
        + f"\n\nBuilt-in models (for --model-path; default {PRESET_SCHEME}{DEFAULT_PRESET}):\n"
        + describe_presets(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ServerArgs.add_cli_args(parser)
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False  # we default to the built-in tiny model
            action.help = f"Checkpoint directory, hub id, or {PRESET_SCHEME}<preset>."
    _add_harli_args(parser)
    return parser


def _given(argv: list[str], *flags: str) -> bool:
    return any(arg == f or arg.startswith(f + "=") for arg in argv for f in flags)


def _strip(argv: list[str], parser: argparse.ArgumentParser, dests: set[str]) -> list[str]:
    """Remove the flags whose destination is in ``dests`` (with their values) from ``argv``."""
    takes_value = {}
    for action in parser._actions:
        if action.dest in dests:
            for opt in action.option_strings:
                takes_value[opt] = action.nargs != 0
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in takes_value:
            skip = takes_value[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def _checkpoint_dtype(model_dir: str) -> str | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def check_model_dir(model_dir: str, argv: list[str]) -> None:
    """Refuse a local checkpoint SGLang could not serve, with one line naming the file and field.

    Without this, a config that lacks ``architectures`` (as ``transformers`` writes one converted from a
    GGUF file unless told) ends in ``'NoneType' object is not subscriptable`` from deep inside SGLang.
    Hub ids and directories without a ``config.json`` are left to SGLang.
    """
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"argument --model-path: {config_file} is not valid JSON ({exc})") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not isinstance(architectures, list):
        raise UsageError(
            f"argument --model-path: {config_file} has no 'architectures' field; add the model class, "
            'e.g. "architectures": ["LlamaForCausalLM"]'
        )
    supported = _supported_architectures()
    if not any(arch in supported for arch in architectures):
        raise UsageError(
            f"argument --model-path: {config_file} field 'architectures' is {architectures}, "
            "which sglang 0.5.23 cannot serve"
        )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not _given(argv, "--tokenizer-path", "--skip-tokenizer-init") and not any(
        (Path(model_dir) / name).is_file() for name in tokenizer_files
    ):
        raise UsageError(
            f"argument --model-path: {model_dir} has no tokenizer (none of {', '.join(tokenizer_files)}); "
            "save one beside config.json or pass --tokenizer-path"
        )


def _supported_architectures() -> set[str]:
    """SGLang's model classes. Importing its registry imports every model, and some print warnings about
    missing CUDA kernels on the way: those are silenced, so a refusal stays one line."""
    import contextlib
    import logging
    import warnings

    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings(), contextlib.redirect_stdout(devnull):
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            logging.disable(logging.WARNING)
            from sglang.srt.models.registry import ModelRegistry

            return set(ModelRegistry.get_supported_archs())
    finally:
        logging.disable(logging.NOTSET)
        os.dup2(saved, 2)
        os.close(saved)


def _on_harli_cpu() -> bool:
    from sglang.srt.platforms import current_platform

    from sglang_harli.srt.platforms.cpu import HarliCpuPlatform

    return isinstance(current_platform, HarliCpuPlatform)


def prepare(argv: list[str]):
    """Parse and validate ``argv``; return SGLang's ``ServerArgs`` carrying our config. No process starts."""
    from sglang.srt.server_args import prepare_server_args

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        config = struct_from_flags(HarliConfig, vars(ns), flag=flag_name, dest_prefix=HARLI_DEST)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if config.data_dir:
        if not os.path.isdir(config.data_dir):
            raise UsageError(f"argument --harli-data-dir: {config.data_dir!r} is not a directory")
        config = msgspec.structs.replace(config, data_dir=os.path.abspath(config.data_dir))
    if config.state_dir:
        try:
            os.makedirs(config.state_dir, exist_ok=True)
        except OSError as exc:
            detail = f"cannot create {config.state_dir!r}: {exc.strerror}"
            raise UsageError(f"argument --harli-state-dir: {detail}") from None
        config = msgspec.structs.replace(config, state_dir=os.path.abspath(config.state_dir))
    harli_dests = {HARLI_DEST + f.name for f in msgspec.structs.fields(HarliConfig)}
    sglang_argv = _strip(argv, parser, harli_dests | {"model_path"})

    model_arg = ns.model_path or PRESET_SCHEME + DEFAULT_PRESET
    try:
        model_dir = resolve_model_path(model_arg)
    except ValueError as exc:
        raise UsageError(f"argument --model-path: {exc}") from None
    check_model_dir(model_dir, argv)
    sglang_argv += ["--model-path", model_dir]
    if is_preset_path(model_arg) and not _given(argv, "--served-model-name"):
        # SGLang reserves ':' for "model:adapter", so harli:tiny is served as harli-tiny.
        sglang_argv += ["--served-model-name", model_arg.replace(":", "-")]

    if _on_harli_cpu():
        # Fields whose SGLang default is None (attention and sampling backends, KV pool size) are filled by
        # the platform's apply_server_args_defaults, for plain SGLang launches too. These have non-None
        # SGLang defaults, so only the launcher, which sees the command line, can tell "unset" apart.
        defaults = {"--device": "cpu", "--lora-backend": "torch_native"}
        # SGLang's "auto" turns float32 checkpoints into float16 (a GPU habit); on a CPU that is both slower
        # and less exact, so keep the checkpoint's float32.
        if _checkpoint_dtype(model_dir) == "float32":
            defaults["--dtype"] = "float32"
        # SGLang's default host backup for retracted PD-decode requests registers memory with CUDA and dies
        # with "Found no NVIDIA driver"; a CPU keeps the backup as plain tensors.
        if _given(argv, "--disaggregation-mode") and not _given(
            argv, "--disaggregation-decode-retraction-backup"
        ):
            defaults["--disaggregation-decode-retraction-backup"] = "cpu_tensor"
        for flag, value in defaults.items():
            if not _given(argv, flag):
                sglang_argv += [flag, value]
        # An idle scheduler otherwise spins a core at 100%, which on a laptop's few cores slows everything
        # else, training included; asleep it still wakes the moment a request reaches its socket, and
        # HarliScheduler never sleeps while a finetune job has work.
        if not _given(argv, "--sleep-on-idle"):
            sglang_argv += ["--sleep-on-idle"]

    try:
        server_args = prepare_server_args(sglang_argv)
        server_args._harli_config = config
        server_args.resolve_once()  # SGLang's cross-flag rules and checks: they raise before anything
        server_args.check_server_args()  # is spawned, so a bad combination is a usage error, not a crash
    except SystemExit as exc:  # SGLang's own parser disagreed; our parse above should have caught it
        raise UsageError(f"invalid arguments (exit {exc.code})") from None
    except (ValueError, TypeError, AssertionError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if config.peers:
        from sglang_harli.core.fleet.peers import parse_peers

        try:
            peers = parse_peers(config.peers)
        except ValueError as exc:
            raise UsageError(f"argument --harli-peers: {exc}") from None
        own = {f"http://{server_args.host}:{server_args.port}", f"http://localhost:{server_args.port}"}
        config = msgspec.structs.replace(config, peers=",".join(p for p in peers if p not in own))
        server_args._harli_config = config
        if not server_args.admin_api_key:  # peer calls must be refusable
            raise UsageError("argument --harli-peers: needs --admin-api-key (the same on every instance)")
    if config.state_dir and server_args.dp_size > 1:  # every rank would resume the same jobs
        raise UsageError("argument --harli-state-dir: not supported with --dp-size above 1 yet")
    if config.state_dir and server_args.tp_size > 1:  # checkpoints would need every rank's optimizer slice
        raise UsageError("argument --harli-state-dir: not supported with --tp-size above 1 yet")
    return server_args


def _fork_server_processes() -> None:
    """Start the scheduler and detokenizer processes by fork, not spawn, on a Linux CPU.

    SGLang spawns them (``_set_envs_and_config`` sets the start method), so each child imports torch,
    transformers and SGLang afresh: about 10 of a CPU server's 27 s to ready on two cores, while the
    launcher already holds every module they need. Spawn is there for CUDA, which cannot be used in a
    forked child once initialized; a CPU server never initializes it, and at the moment the children start
    the launcher runs no thread of its own yet (the tokenizer manager and uvicorn come after).
    ``HARLI_MP_START=spawn`` restores SGLang's choice."""
    import multiprocessing

    import sglang.srt.entrypoints.engine as engine

    sglang_set = engine._set_envs_and_config

    def set_envs_and_config(server_args) -> None:
        sglang_set(server_args)
        multiprocessing.set_start_method("fork", force=True)

    engine._set_envs_and_config = set_envs_and_config


def run(server_args) -> None:
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.utils import kill_process_tree

    from sglang_harli.srt import app
    from sglang_harli.srt.scheduler import run_harli_scheduler_process

    app.install()
    if _on_harli_cpu() and sys.platform == "linux" and os.environ.get("HARLI_MP_START", "fork") == "fork":
        _fork_server_processes()
    try:
        launch_server(server_args, run_scheduler_process_func=run_harli_scheduler_process)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from sglang.srt.plugins import load_plugins

        load_plugins()
        server_args = prepare(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        run(server_args)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT): stop at once, every process of the server with it (run)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
