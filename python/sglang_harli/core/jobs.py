"""Finetune jobs: the HTTP schema (``FinetuneJobSpec`` in, ``JobStatus`` out) and the job book.

The spec is a msgspec struct, so decoding a request *is* validating it: a wrong type or an out-of-range
hyper-parameter fails with the JSON path of the field (``$.training.epochs``). What only the server knows
(is LoRA enabled, how large a rank its adapter pool holds, which modules it serves) is checked against
``ServingLimits``, and the error names the server flag to change.

``JobBook`` is the state machine: queued -> running -> completed | failed | cancelled, one job trains at a
time in submission order. It holds no tensors; the trainer that executes the running job lives beside it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec

JOB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?!\n)$"
"""A job's name is a directory name: no separators, no leading dot. ``(?!\n)`` because Python's ``$`` also
matches before a trailing newline; the pattern is valid ECMAScript too, for the OpenAPI document."""
MAX_SEED = 2**31 - 1
PEFT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
FINISHED_STATES = frozenset({"completed", "failed", "cancelled"})


class SpecError(ValueError):
    """A job the server refuses. ``field`` is the spec field at fault; ``status`` the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class DatasetSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    records: list[dict[str, Any]] | None = None
    """Inline records (small datasets): prompt/completion, messages or text objects."""
    path: str | None = None
    """A JSONL file relative to the server's ``--harli-data-dir``."""


class LoraSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    r: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    alpha: Annotated[float, msgspec.Meta(gt=0)] = 32.0
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["q_proj", "v_proj"]
    )


class TrainingSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    learning_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 2e-4
    micro_batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    gradient_accumulation_steps: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    max_seq_len: Annotated[int, msgspec.Meta(ge=2, le=1 << 20)] = 512
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] = 0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup, as ``transformers.get_scheduler`` names it (constant keeps warmup)."""
    warmup_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    weight_decay: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    max_grad_norm: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_steps: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Stop after this many optimizer steps even if epochs remain."""


class PublishSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    every_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Also publish a version every N optimizer steps (0: only the final adapter)."""


class FinetuneJobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=JOB_NAME_PATTERN)]
    """The job's name, which is also the adapter name clients pass as ``lora_path``."""
    dataset: DatasetSpec
    lora: LoraSpec = msgspec.field(default_factory=LoraSpec)
    training: TrainingSpec = msgspec.field(default_factory=TrainingSpec)
    publish: PublishSpec = msgspec.field(default_factory=PublishSpec)


class PublishedVersion(msgspec.Struct, kw_only=True):
    version: int
    step: int
    path: str
    loaded: bool = False
    """True once the server answers ``lora_path=<name>`` with this version."""
    error: str | None = None


class JobStatus(msgspec.Struct, kw_only=True):
    name: str
    state: JobState = "queued"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    examples: int = 0
    tokens_trained: int = 0
    loss: float | None = None
    """Mean completion-token loss of the latest optimizer step."""
    tokens_per_s: float | None = None
    output_dir: str = ""
    adapter_path: str | None = None
    """The newest published adapter directory (PEFT format)."""
    published: list[PublishedVersion] = msgspec.field(default_factory=list)
    error: str | None = None
    resumes: int = 0
    """Times the job was resumed from a checkpoint after the server restarted (``--harli-state-dir``)."""
    checkpoint_step: int | None = None
    """Optimizer step of the newest checkpoint written or resumed from."""
    created_at: float = msgspec.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    spec: FinetuneJobSpec | None = None


class ServingLimits(msgspec.Struct, kw_only=True, frozen=True):
    """What the serving side can hold, read from SGLang's resolved LoRA settings."""

    enable_lora: bool
    max_lora_rank: int | None = None
    target_modules: frozenset[str] | None = None
    """PEFT module names the adapter pool serves (``None``: every module)."""


def decode_spec(body: bytes) -> FinetuneJobSpec:
    try:
        return msgspec.json.decode(body, type=FinetuneJobSpec)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rsplit(" - at `$.", 1)[1].rstrip("`") if " - at `$." in message else "body"
        raise SpecError(field, message.split(" - at ")[0], status=422) from None
    except msgspec.DecodeError as exc:
        raise SpecError("body", f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError("body", f"not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise SpecError("body", "nested too deeply") from None


def check_servable(spec: FinetuneJobSpec, limits: ServingLimits) -> None:
    """Refuse a job whose adapter the server could not load, naming the server flag to change."""
    if not limits.enable_lora:
        raise SpecError("lora", "LoRA serving is off; restart the server with --enable-lora")
    unknown = sorted(set(spec.lora.target_modules) - set(PEFT_TARGET_MODULES))
    if unknown:
        raise SpecError(
            "lora.target_modules", f"unknown modules {unknown}; choose from {list(PEFT_TARGET_MODULES)}"
        )
    chosen = set(spec.lora.target_modules)
    # SGLang serves q/k/v and gate/up as fused modules; its adapter loader stacks q with v (k may be
    # missing) and gate with up (up may be missing), and would fail or ignore the other combinations.
    if chosen & {"q_proj", "k_proj", "v_proj"} and not {"q_proj", "v_proj"} <= chosen:
        raise SpecError(
            "lora.target_modules",
            "SGLang serves q_proj, k_proj and v_proj as one fused module and loads a LoRA on it only "
            "with both q_proj and v_proj (k_proj optional); add the missing ones",
        )
    if "up_proj" in chosen and "gate_proj" not in chosen:
        raise SpecError(
            "lora.target_modules",
            "SGLang serves gate_proj and up_proj as one fused module; a LoRA on up_proj needs gate_proj",
        )
    if limits.max_lora_rank is not None and spec.lora.r > limits.max_lora_rank:
        raise SpecError(
            "lora.r",
            f"rank {spec.lora.r} is above the server's --max-lora-rank {limits.max_lora_rank}; "
            "lower lora.r or restart with a larger --max-lora-rank",
        )
    if limits.target_modules is not None:
        outside = sorted(set(spec.lora.target_modules) - limits.target_modules)
        if outside:
            raise SpecError(
                "lora.target_modules",
                f"{outside} are not served (--lora-target-modules covers {sorted(limits.target_modules)}); "
                "drop them or restart with --lora-target-modules all",
            )


class JobBook:
    """Every job this server was given, in submission order; at most one is running."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobStatus] = {}

    def submit(self, spec: FinetuneJobSpec, *, examples: int, total_steps: int, output_dir: str) -> JobStatus:
        previous = self._jobs.get(spec.name)
        if previous is not None and not self.name_is_free(spec.name):
            raise SpecError(
                "name", f"a job named {spec.name!r} already exists ({previous.state})", status=409
            )
        self._jobs.pop(spec.name, None)  # a failed or cancelled job that published nothing gives way
        status = JobStatus(
            name=spec.name,
            examples=examples,
            total_steps=total_steps,
            epochs=spec.training.epochs,
            output_dir=output_dir,
            spec=spec,
        )
        self._jobs[spec.name] = status
        return status

    def forget(self, name: str) -> None:
        """Drop a job that was never acknowledged (recording it failed)."""
        self._jobs.pop(name, None)

    def restore(self, job: JobStatus) -> None:
        """Take back a job recorded by an earlier run of the server."""
        self._jobs[job.name] = job

    def active(self) -> int:
        """Jobs queued or running."""
        return sum(job.state not in FINISHED_STATES for job in self._jobs.values())

    def name_is_free(self, name: str) -> bool:
        job = self._jobs.get(name)
        return job is None or (job.state in ("failed", "cancelled") and not job.published)

    def get(self, name: str) -> JobStatus:
        job = self._jobs.get(name)
        if job is None:
            raise SpecError("name", f"no job named {name!r}", status=404)
        return job

    def all(self) -> list[JobStatus]:
        return list(self._jobs.values())

    def next_queued(self) -> JobStatus | None:
        return next((j for j in self._jobs.values() if j.state == "queued"), None)

    def start(self, job: JobStatus) -> None:
        job.state = "running"
        job.started_at = time.time()

    def finish(self, job: JobStatus, state: JobState, error: str | None = None) -> None:
        job.state = state
        job.error = error
        job.finished_at = time.time()

    def cancel(self, name: str) -> JobStatus:
        job = self.get(name)
        if job.state in FINISHED_STATES:
            raise SpecError("name", f"job {name!r} already {job.state}", status=409)
        self.finish(job, "cancelled")
        return job
