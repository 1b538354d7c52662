"""Finetune jobs: the HTTP schema (``FinetuneJobSpec`` in, ``JobStatus`` out) and the job book.

The spec is a msgspec struct, so decoding a request *is* validating it: a wrong type or an out-of-range
hyper-parameter fails with the JSON path of the field (``$.training.epochs``). What only the server knows
(is LoRA enabled, how large a rank its adapter pool holds, which modules it serves) is checked against
``ServingLimits``, and the error names the server flag to change.

``JobBook`` is the state machine: queued -> running -> publishing -> completed, and failed or cancelled
from any unfinished state; one job trains at a time in submission order. ``publishing`` is a job whose
training is over and whose final adapter is written, waiting for the tokenizer manager to serve
it. The book holds no tensors; the trainer that runs the job lives beside it (``core.runner.runner``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from sglang_harli.core.errors import SpecError, SpecInvalid

JOB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?!\n)$"
"""A job's name is a directory name: no separators, no leading dot. ``(?!\n)`` because Python's ``$`` also
matches before a trailing newline; the pattern is valid ECMAScript too, for the OpenAPI document."""
MAX_SEED = 2**31 - 1
PEFT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    early_stopping: EarlyStoppingSpec | None = None
    """Stop once the eval loss stops improving (needs ``eval`` with an eval set)."""
    instances: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """Train data-parallel on this many instances of the fleet (``--harli-peers``), each on its shard,
    averaging their adapters every ``average_every`` steps (``core.fleet.local_sgd``); 1 trains here only."""
    average_every: Annotated[int, msgspec.Meta(ge=1)] = 8
    """With ``instances`` above 1: local optimizer steps between two averages (local SGD's K)."""


class EarlyStoppingSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Stop when the eval loss has not improved for ``patience`` evaluations in a row (needs an eval set)."""

    patience: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    min_delta: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """An eval loss must be lower than the best so far by more than this to count as an improvement."""


class PublishSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    every_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Also publish a version every N optimizer steps (0: only the final adapter)."""
    version: Literal["last", "best"] = "last"
    """Which adapter the final version is: the last one trained, or the one with the best eval loss (needs
    an eval set). ``"publish": "best"`` is short for ``{"version": "best"}``."""


class RetentionProbe(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A question the base model already answers right: the adapter's greedy answer must still contain
    ``expect`` (case-insensitive). Give ``prompt`` (tokenized as a completion request's) or ``messages``
    (rendered with the chat template and its generation prompt, as a chat request)."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    expect: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]


MAX_RETENTION_PROBES = 256


class EvalSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Evaluation while the job trains, as HF Trainer's ``eval_strategy="steps"`` reports it."""

    records: list[dict[str, Any]] | None = None
    """Inline eval records, in any dataset format."""
    path: str | None = None
    """An eval JSONL file relative to ``--harli-data-dir`` (named like ``dataset.path``)."""
    split: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = None
    """Hold out this fraction of the dataset's examples for eval, drawn with the job's seed."""
    every_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Also evaluate every N optimizer steps (0: only at the end); the end is always evaluated."""
    retention: (
        Annotated[list[RetentionProbe], msgspec.Meta(max_length=MAX_RETENTION_PROBES)] | Literal["builtin"]
    ) = msgspec.field(default_factory=list)
    """Retention probes, or ``"builtin"`` for the general-knowledge set a built-in pretrained model ships."""
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=256)] = 24
    """Greedy tokens generated per retention probe."""
    retention_floor: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    """Of the probes the base model answers right (asked through the server when the job is submitted),
    the share an adapter must still answer right to be published; 1.0 (every one) when probes are given.
    ``publish: "best"`` chooses among evaluations that keep it, early stopping also stops once it has
    been missed for ``patience`` evaluations in a row, ``publish.every_steps`` skips versions below it,
    and a job none of whose evaluations keeps it publishes nothing and fails."""

    @property
    def has_set(self) -> bool:
        return self.records is not None or self.path is not None or self.split is not None

    @property
    def floor(self) -> float | None:
        """The retention floor in force: the given one, 1.0 with probes, ``None`` without probes."""
        if not self.retention:
            return None
        return 1.0 if self.retention_floor is None else self.retention_floor


MAX_REHEARSAL_PROMPTS = 1024
RehearsalPrompt = str | Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]
"""A completion prompt, or chat messages (rendered with the chat template and its generation prompt)."""


class RehearsalSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Rehearsal: the served base model's own answers to other prompts, mixed into training so that the
    adapter keeps saying what the base model said about everything else."""

    prompts: (
        Annotated[list[RehearsalPrompt], msgspec.Meta(min_length=1, max_length=MAX_REHEARSAL_PROMPTS)]
        | Literal["builtin"]
    )
    """Prompts the base model answers (greedily, through the server, when the job is submitted), or
    ``"builtin"`` for the set a built-in pretrained model ships (distinct from its retention probes)."""
    ratio: Annotated[float, msgspec.Meta(gt=0, le=16)] = 0.5
    """Rehearsal examples per training example, every epoch (drawn in turn from the answers; at most all
    of them in one epoch)."""
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=512)] = 64
    """Greedy tokens the base model answers each prompt with, at most."""


class FinetuneJobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=JOB_NAME_PATTERN)]
    """The job's name, which is also the adapter name clients pass as ``lora_path``."""
    dataset: DatasetSpec
    lora: LoraSpec = msgspec.field(default_factory=LoraSpec)
    training: TrainingSpec = msgspec.field(default_factory=TrainingSpec)
    publish: PublishSpec | Literal["last", "best"] = msgspec.field(default_factory=PublishSpec)
    eval: EvalSpec | None = None
    """Eval loss and token accuracy on an eval set, and retention probes, during and after training."""
    rehearsal: RehearsalSpec | None = None
    """The base model's own answers to other prompts, mixed into every epoch (``RehearsalSpec``)."""
    placement: str | None = None
    """With ``--harli-peers``: the instance (base URL, this one's or a peer's) to train on, in place of
    the one with the most spare capacity now."""

    def __post_init__(self):
        if isinstance(self.publish, str):
            self.publish = PublishSpec(version=self.publish)


class ServingLimits(msgspec.Struct, kw_only=True, frozen=True):
    """What the serving side can hold, read from SGLang's resolved LoRA settings."""

    enable_lora: bool
    max_lora_rank: int | None = None
    target_modules: frozenset[str] | None = None
    """PEFT module names the adapter pool serves (``None``: every module)."""


def decode_spec(body: bytes) -> FinetuneJobSpec:
    spec = _decode_spec(body)
    check_eval(spec)
    return spec


def _decode_spec(body: bytes) -> FinetuneJobSpec:
    try:
        return msgspec.json.decode(body, type=FinetuneJobSpec)
    except msgspec.ValidationError as exc:
        raise SpecInvalid.from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise SpecError("body", f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError("body", f"not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise SpecError("body", "nested too deeply") from None


def check_eval(spec: FinetuneJobSpec) -> None:
    """Cross-field rules of ``eval``, ``training.early_stopping`` and ``publish`` (422 naming the field)."""
    evaluation = spec.eval
    if evaluation is not None:
        given = [f"eval.{k}" for k in ("records", "path", "split") if getattr(evaluation, k) is not None]
        if len(given) > 1:
            raise SpecInvalid(given[1], f"give one eval set, not {' and '.join(given)}")
        if not evaluation.has_set and not evaluation.retention:
            raise SpecInvalid("eval", "give an eval set (records, path or split) or retention probes")
        if evaluation.split is not None and spec.dataset.records is None and spec.dataset.path is None:
            raise SpecInvalid("eval.split", "needs a dataset to split")
        for i, probe in enumerate(evaluation.retention if isinstance(evaluation.retention, list) else []):
            if (probe.prompt is None) == (probe.messages is None):
                raise SpecInvalid(f"eval.retention[{i}]", "give exactly one of prompt or messages")
    has_set = evaluation is not None and evaluation.has_set
    if spec.training.early_stopping is not None and not has_set:
        raise SpecInvalid(
            "training.early_stopping", "watches the eval loss: give eval.records, eval.path or eval.split"
        )
    if spec.publish.version == "best" and not has_set:
        raise SpecInvalid(
            "publish", '"best" is chosen by eval loss: give eval.records, eval.path or eval.split'
        )
    training = spec.training
    if spec.rehearsal is not None and isinstance(spec.rehearsal.prompts, list):
        for i, prompt in enumerate(spec.rehearsal.prompts):
            if isinstance(prompt, str) and not prompt.strip():
                raise SpecInvalid(f"rehearsal.prompts[{i}]", "is empty")
    if training.instances > 1:
        if evaluation is not None:
            raise SpecInvalid("eval", "is not available with training.instances above 1 yet")
        if spec.rehearsal is not None:
            raise SpecInvalid("rehearsal", "is not available with training.instances above 1 yet")
        every = spec.publish.every_steps
        if every % training.average_every:
            raise SpecInvalid(
                "publish.every_steps",
                f"must be a multiple of training.average_every ({training.average_every}) with several "
                "instances: a version is published right after an average, when every member holds it",
            )


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
