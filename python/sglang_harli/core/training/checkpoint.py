"""Training checkpoints that survive a kill at any instant: written whole or not at all, and verified.

A checkpoint is a directory ``step-<NNNNNNNN>/`` holding

- ``adapter_model.safetensors``: the LoRA weights, named as the PEFT model names its parameters;
- ``optimizer.pt``: the optimizer's and the learning-rate schedule's state (``torch.save``, read back with
  ``weights_only=True``, so a checkpoint cannot run code);
- ``progress.json``: where the run stands (optimizer steps, micro-batches started, tokens, last loss). The
  trainer's randomness (shuffles, dropout) is a pure function of the job's seed and these counters, so
  they *are* its RNG state;
- ``manifest.json``, written last: the SHA-256 of every other file.

It is written into a hidden sibling, each file flushed to disk, and renamed into place, so a reader never
sees a half-written directory under its final name. A rename is only as durable as the file system makes
it, so ``latest()`` also checks the manifest: a checkpoint whose files do not match it (torn by a crash
on a file system that reordered the writes, or damaged since) is skipped for the one before it. The
newest ``KEEP`` checkpoints are kept for exactly that reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sglang_harli.core.files import fsync_dir, fsync_write

logger = logging.getLogger(__name__)

KEEP = 2
WEIGHTS, OPTIMIZER, PROGRESS, MANIFEST = (
    "adapter_model.safetensors",
    "optimizer.pt",
    "progress.json",
    "manifest.json",
)


class Progress(msgspec.Struct, kw_only=True):
    step: int
    """Optimizer steps taken."""
    micro_batches: int
    """Micro-batches started (seeds dropout)."""
    tokens_trained: int
    loss: float | None = None


class TrainerState(msgspec.Struct, kw_only=True):
    """Everything a trainer needs to continue a run exactly where it stood at an optimizer-step boundary."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    progress: Progress


class CheckpointError(Exception):
    """A checkpoint that is incomplete or does not match its manifest."""


def encode(state: TrainerState) -> dict[str, bytes]:
    """The files of a checkpoint, as bytes. Cheap to call on the training thread; writing is the slow part."""
    buffer = io.BytesIO()
    torch.save({"optimizer": state.optimizer, "schedule": state.schedule}, buffer)
    weights = {name: t.detach().to("cpu").contiguous() for name, t in state.weights.items()}
    return {
        WEIGHTS: save_safetensors(weights),
        OPTIMIZER: buffer.getvalue(),
        PROGRESS: msgspec.json.encode(state.progress),
    }


class CheckpointDir:
    """The checkpoints of one job: ``<root>/step-<N>/``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def write(self, step: int, files: dict[str, bytes]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=self.root))
        try:
            digests = {}
            for name, data in files.items():
                fsync_write(tmp / name, data)
                digests[name] = hashlib.sha256(data).hexdigest()
            fsync_write(tmp / MANIFEST, json.dumps({"step": step, "sha256": digests}).encode())
            fsync_dir(tmp)
            if final.exists():  # the same step written again after a resume: the new one wins
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def steps(self) -> list[int]:
        """Steps of the checkpoints present (verified or not), newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith("step-") and entry.name[5:].isdigit():
                found.append(int(entry.name[5:]))
        return sorted(found, reverse=True)

    def read(self, step: int) -> TrainerState:
        """The checkpoint of ``step``, verified against its manifest; ``CheckpointError`` if it is torn."""
        directory = self.root / f"step-{step:08d}"
        try:
            manifest = json.loads((directory / MANIFEST).read_bytes())
            digests = manifest["sha256"]
            files = {name: (directory / name).read_bytes() for name in (WEIGHTS, OPTIMIZER, PROGRESS)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{directory.name}: incomplete ({exc})") from None
        for name, data in files.items():
            if hashlib.sha256(data).hexdigest() != digests.get(name):
                raise CheckpointError(f"{directory.name}: {name} does not match the manifest")
        try:
            saved = torch.load(io.BytesIO(files[OPTIMIZER]), weights_only=True)
            return TrainerState(
                weights=load_safetensors(files[WEIGHTS]),
                optimizer=saved["optimizer"],
                schedule=saved["schedule"],
                progress=msgspec.json.decode(files[PROGRESS], type=Progress),
            )
        except Exception as exc:  # verified bytes that still do not parse: written by something else
            raise CheckpointError(f"{directory.name}: unreadable ({type(exc).__name__}: {exc})") from None

    def latest(self) -> TrainerState | None:
        """The newest checkpoint that verifies. Torn ones are logged and removed, so that pruning after
        the next write never keeps a torn checkpoint in place of a good one."""
        for step in self.steps():
            try:
                return self.read(step)
            except CheckpointError as exc:
                logger.warning("checkpoint of %s torn, using the one before: %s", self.root.parent.name, exc)
                shutil.rmtree(self.root / f"step-{step:08d}", ignore_errors=True)
        return None

    def _prune(self) -> None:
        for step in self.steps()[KEEP:]:
            shutil.rmtree(self.root / f"step-{step:08d}", ignore_errors=True)
        for entry in self.root.iterdir():  # writers killed mid-checkpoint leave hidden temporaries
            if entry.name.startswith(".step-") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
