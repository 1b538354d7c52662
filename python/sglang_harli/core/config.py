"""``HarliConfig``: every ``--harli-*`` flag, as one typed, validated struct.

The struct is the single source of truth: the launcher derives its flags, help texts and validation from
the fields below, the scheduler receives it pickled inside SGLang's ``ServerArgs``, and ``/harli/stats``
reports it back, so what the user asked for and what the server runs with cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Positive = msgspec.Meta(gt=0)
PolicyName = Literal["harli", "idle-only", "naive", "static"]


class HarliConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tpot_slo_ms: Annotated[float, Positive] = 100.0
    """Decode time-per-output-token objective in milliseconds; each decode step should finish within it."""

    slo_percentile: Annotated[float, msgspec.Meta(gt=0, le=100)] = 99.0
    """Percentile of decode steps that must meet --harli-tpot-slo-ms (99 means p99)."""

    stats_window: Annotated[int, msgspec.Meta(ge=16, le=1_000_000)] = 2048
    """How many recent decode steps /harli/stats summarises (latency percentiles, SLO attainment)."""

    data_dir: str = ""
    """Directory finetune jobs may read dataset files from (``dataset.path`` is relative to it)."""

    output_dir: str = ""
    """Where trained adapters are written, one directory per job; empty: ``<cache>/adapters``."""

    idle_train_ms: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 50.0
    """With no decode work, train for up to this long before looking for new requests again."""

    policy: PolicyName = "harli"
    """How finetune work joins decode: ``harli`` (SLO-aware, predictor-driven) or a baseline."""

    static_units: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 2
    """Units the ``static`` baseline admits after every decode step, whatever the latency."""

    layers_per_unit: Annotated[int, msgspec.Meta(ge=1, le=1_000)] = 1
    """Decoder layers in one forward or backward unit: the granularity of admission."""

    profile: Literal["auto", "skip", "refresh"] = "auto"
    """Start-up profiling of finetune unit costs: ``auto`` uses the cache for this model and hardware."""

    sm_partitions: Literal["auto", "off"] = "auto"
    """On CUDA, let the policy run finetune work in a green context holding part of the SMs."""

    kv_lending: Literal["auto", "off"] = "auto"
    """Lend free KV-cache pages to the trainer for its activations, taken back when decode needs them."""

    trainer_memory_mb: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Ordinary memory the trainer's activations may use beyond lent KV pages, in MiB; 0: no limit."""

    state_dir: str = ""
    """Directory for durable finetune state (jobs, tokenized datasets, checkpoints); with it, unfinished
    jobs resume after a restart and published adapters are served again. Empty: jobs last one run."""

    checkpoint_every_steps: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 20
    """With --harli-state-dir, checkpoint a running job every N optimizer steps (and whenever it
    publishes); 0: only when it publishes."""

    max_jobs: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    """Most finetune jobs queued or running at once; more are refused with 429."""

    max_request_mb: Annotated[float, msgspec.Meta(gt=0)] = 64.0
    """Largest /harli request body (an inline dataset), in MiB; larger ones are refused with 413."""

    max_dataset_mb: Annotated[float, msgspec.Meta(gt=0)] = 1024.0
    """Largest dataset file under --harli-data-dir a job may read, in MiB."""

    kv_poison: bool = False
    """Debugging: fill lent KV pages with a pattern and check, when they come back, that only the
    trainer wrote them (and poison them again for decode)."""


FIELD_HELP: dict[str, str] = {
    "tpot_slo_ms": "Decode time-per-output-token SLO in ms (default %(default)s).",
    "slo_percentile": "Percentile of decode steps that must meet the SLO (default %(default)s).",
    "stats_window": "Recent decode steps summarised by /harli/stats (default %(default)s).",
    "data_dir": "Directory finetune jobs may read dataset files from (dataset.path is relative to it).",
    "output_dir": "Where trained adapters are written (default: <cache>/adapters, see HARLI_CACHE_DIR).",
    "idle_train_ms": "With no decode work, train this long between request polls (default %(default)s).",
    "policy": "Co-location policy: harli, or a baseline idle-only/naive/static (default %(default)s).",
    "static_units": "Finetune units the static policy runs after each decode step (default %(default)s).",
    "layers_per_unit": "Decoder layers per forward/backward finetune unit (default %(default)s).",
    "profile": "Finetune unit-cost profiling at start: auto (cached), skip, refresh (default %(default)s).",
    "sm_partitions": "CUDA green-context SM splits for finetune work: auto or off (default %(default)s).",
    "kv_lending": "Lend free KV-cache pages to the trainer's activations: auto or off (default %(default)s).",
    "trainer_memory_mb": "Ordinary memory (MiB) for activations beyond lent KV pages; 0: no limit (default).",
    "state_dir": "Durable finetune state: jobs resume after a restart (default: off, jobs last one run).",
    "checkpoint_every_steps": "Checkpoint running jobs every N optimizer steps (default %(default)s).",
    "max_jobs": "Most finetune jobs queued or running at once (default %(default)s).",
    "max_request_mb": "Largest /harli request body in MiB (default %(default)s).",
    "max_dataset_mb": "Largest dataset file a job may read, in MiB (default %(default)s).",
    "kv_poison": "Debug: poison lent KV pages and check on return that only the trainer wrote them.",
}


def flag_name(field: str) -> str:
    return "--harli-" + field.replace("_", "-")


def config_from_flags(values: dict[str, object]) -> HarliConfig:
    """Build the config from parsed flag values (``None`` = not given), naming the flag on error."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return msgspec.convert(given, HarliConfig)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for field in msgspec.structs.fields(HarliConfig):
            if f"`$.{field.name}`" in message:
                detail = message.split(" - at ")[0]
                raise ValueError(f"argument {flag_name(field.name)}: {detail}") from None
        raise ValueError(message) from None
