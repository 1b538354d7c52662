"""Where the Tinker API's saved weights live, named by their ``tinker://`` paths (engine-free).

The SDK names what a training client saves with a path it hands back and later passes to
``load_weights`` or ``create_sampling_session``, possibly from another process after a server restart
(the cookbook's recipes resume that way): ``tinker://<model_id>/<kind>/<name>``, where ``kind`` is

- ``weights``: the training state (``save_weights``): the LoRA weights, AdamW's moments and step counts,
  the adapter's configuration. Written in the durable checkpoint format (``core.training.checkpoint``): whole
  or not at all, verified against a manifest when read. Under ``--harli-state-dir`` it survives a restart.
- ``sampler_weights``: an adapter to sample from (``save_weights_for_sampler``), in PEFT's own format,
  which SGLang loads as it loads any adapter.

A path maps to one directory, ``<root>/<model_id>/<kind>/<name>``; a name is a single path component
(the cookbook's are ``"000020"`` and ``"final"``), so no path reaches outside the root.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from sglang_harli.core.errors import NotFound, SpecError
from sglang_harli.core.jobs.spec import LoraSpec
from sglang_harli.core.training.checkpoint import CheckpointDir, CheckpointError, TrainerState, encode

PREFIX = "tinker://"
Kind = Literal["weights", "sampler_weights"]
KINDS: tuple[Kind, ...] = ("weights", "sampler_weights")
LORA = "lora.json"
"""The training state's adapter configuration, next to the checkpoint's own files."""
_RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class TinkerPath:
    run: str
    """The training client's ``model_id``."""
    kind: Kind
    name: str

    @classmethod
    def parse(cls, path: object, field: str) -> TinkerPath:
        """``tinker://<run>/<kind>/<name>``; ``SpecError`` naming ``field`` otherwise."""
        if not isinstance(path, str) or not path.startswith(PREFIX):
            raise SpecError(field, f"must be a {PREFIX}<model_id>/<weights|sampler_weights>/<name> path")
        parts = path[len(PREFIX) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise SpecError(field, f"{path!r} is not {PREFIX}<model_id>/<weights|sampler_weights>/<name>")
        run, kind, name = parts
        if not _RUN.fullmatch(run) or not _NAME.fullmatch(name):
            raise SpecError(field, f"{path!r}: the model id or name has characters a path cannot hold")
        return cls(run, kind, name)  # type: ignore[arg-type]

    @classmethod
    def named(cls, run: str, kind: Kind, name: object, field: str = "path") -> TinkerPath:
        """The path a save of ``name`` (as the client sent it) gets."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SpecError(field, "must be a name of letters, digits, '.', '_' or '-' (no '/')")
        return cls(run, kind, name)

    def __str__(self) -> str:
        return f"{PREFIX}{self.run}/{self.kind}/{self.name}"


class TinkerStore:
    """The saved weights of every training client, under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def directory(self, path: TinkerPath) -> Path:
        return self.root / path.run / path.kind / path.name

    def existing(self, path: TinkerPath, field: str) -> Path:
        """The directory of a saved ``path``; ``NotFound`` naming ``field`` if nothing was saved there."""
        directory = self.directory(path)
        if not directory.is_dir():
            raise NotFound(field, f"nothing was saved as {path}")
        return directory

    def unnamed(self, model_id: str, sampling_session_seq_id: int) -> Path:
        """An unnamed snapshot's directory (``save_weights_and_get_sampling_client``): only its sampling
        session reaches it, so it lives apart from the named ones and goes when that session's snapshot is
        unloaded (``srt.tinker.snapshots``) or the server restarts (``forget_unnamed``)."""
        return self.root / model_id / "unnamed" / str(sampling_session_seq_id)

    def forget_unnamed(self) -> None:
        for directory in self.root.glob("*/unnamed"):
            shutil.rmtree(directory, ignore_errors=True)

    # -- training state (kind "weights") -------------------------------------------------------------
    @staticmethod
    def write_state(directory: str | os.PathLike, state: TrainerState, lora: LoraSpec) -> None:
        """Write a training state durably: a checkpoint directory (``core.training.checkpoint``) of its
        own."""
        files = encode(state)
        files[LORA] = msgspec.json.encode(lora)
        checkpoints = CheckpointDir(directory)
        for step in checkpoints.steps():  # one state per name: saving a name again replaces it
            if step != state.progress.step:
                shutil.rmtree(Path(directory) / f"step-{step:08d}", ignore_errors=True)
        checkpoints.write(state.progress.step, files)

    @staticmethod
    def read_state(directory: str | os.PathLike, field: str) -> tuple[TrainerState, LoraSpec]:
        """A saved training state, verified; ``SpecError`` naming ``field`` if it is missing or torn."""
        checkpoints = CheckpointDir(directory)
        steps = checkpoints.steps()
        if not steps:
            raise SpecError(field, "holds no training state (a sampler_weights path cannot be loaded)")
        try:
            state = checkpoints.read(steps[0])
        except CheckpointError as exc:
            raise SpecError(field, f"the saved state cannot be read: {exc}") from None
        return state, TinkerStore.saved_lora(directory, field)

    @staticmethod
    def saved_lora(directory: str | os.PathLike, field: str) -> LoraSpec:
        """The adapter configuration a training state was saved with (without reading the weights)."""
        steps = CheckpointDir(directory).steps()
        if not steps:
            raise SpecError(field, "holds no training state (a sampler_weights path cannot be loaded)")
        try:
            return msgspec.json.decode(
                (Path(directory) / f"step-{steps[0]:08d}" / LORA).read_bytes(), type=LoraSpec
            )
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SpecError(field, f"the saved state cannot be read: {exc}") from None
