"""The messages between Harli's HTTP side (the tokenizer manager's process) and the scheduler.

One typed request per operation, each naming the type it is answered with (``Reply``), dispatched by
type on the scheduler as SGLang dispatches its own control requests. ``srt.control`` carries them over
SGLang's IPC inside one envelope type; the reply travels as that type's JSON, which the route relays as
it is, so an HTTP body and the scheduler's reply cannot differ. A refusal travels as the error body of
``core.errors`` with the status ``http_status`` gives it.

Adapter publishing crosses in both directions: the scheduler asks the tokenizer manager to serve an
``AdapterVersion`` (``core.jobs.publishing`` sends it, ``srt.jobs.publisher`` receives it), and the tokenizer
manager answers with ``AdapterServed``.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Union

import msgspec

from sglang_harli.core.fleet.group import GroupAssignment
from sglang_harli.core.fleet.placement import FleetCapacity
from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.eval_data import EvalData
from sglang_harli.core.jobs.spec import FinetuneJobSpec, LoraSpec
from sglang_harli.core.jobs.staging import StagedExamples
from sglang_harli.core.tinker.params import AdamParams
from sglang_harli.core.wire.stats import HarliStats


class AdapterVersion(msgspec.Struct, kw_only=True, frozen=True):
    """One published version of a job's adapter: serve the PEFT directory ``path`` as ``name``."""

    name: str
    version: int
    path: str


class Ack(msgspec.Struct, kw_only=True):
    ok: bool = True


class ControlRequest(msgspec.Struct, tag=True, kw_only=True):
    """Base of every request; ``Reply`` is the type the scheduler answers it with."""

    Reply: ClassVar[type]


class SubmitJob(ControlRequest):
    """``POST /harli/jobs``, once the HTTP side has validated the spec and tokenized the dataset."""

    Reply = JobStatus

    spec: FinetuneJobSpec
    count: int
    """Trainable examples in the dataset."""
    examples: list[Example] = msgspec.field(default_factory=list)
    """The examples themselves, without --harli-state-dir."""
    staged: StagedExamples | None = None
    """With --harli-state-dir: where the HTTP process wrote them instead (``core.jobs.store``)."""
    evaluation: EvalData | None = None
    """The job's tokenized eval set and retention probes (``core.jobs.evaluation``), if it has ``eval``."""
    rehearsal: int = 0
    """Of the ``count`` examples, the last this many are the base model's answers to the job's rehearsal
    prompts (``core.jobs.rehearsal``)."""
    group: GroupAssignment | None = None
    """This instance's place in a job trained on several instances (``training.instances``): the
    examples are then its shard."""


class ListJobs(ControlRequest):
    """``GET /harli/jobs``."""

    Reply = list[JobStatus]


class GetJob(ControlRequest):
    """``GET /harli/jobs/{name}``."""

    Reply = JobStatus

    name: str


class CancelJob(ControlRequest):
    """``POST /harli/jobs/{name}/cancel``."""

    Reply = JobStatus

    name: str


class GetStats(ControlRequest):
    """``GET /harli/stats``."""

    Reply = HarliStats


class GetCapacity(ControlRequest):
    """What this instance has to give a new job now (a fleet's placement, ``core.fleet``)."""

    Reply = FleetCapacity


class AdapterServed(ControlRequest):
    """Tokenizer manager -> scheduler: the version it was asked to serve serves now, or ``error``."""

    Reply = Ack

    name: str
    version: int
    error: str | None = None


class AdaptersToServe(ControlRequest):
    """At start-up with --harli-state-dir: every job's newest version, to be served again."""

    Reply = list[AdapterVersion]


class TinkerCreateModel(ControlRequest):
    """Tinker ``create_model``: a training client with a fresh adapter over the served weights."""

    Reply = Ack

    model_id: str
    lora: LoraSpec
    seed: int = 0


class TinkerForwardBackward(ControlRequest):
    """Tinker ``forward_backward``: queue it on the model's trainer; its result follows as a
    ``HarliTinkerResult`` for ``request_id``."""

    Reply = Ack

    model_id: str
    request_id: str
    body: bytes
    """The ``ForwardBackwardRequest`` protobuf, already checked by the HTTP side."""


class TinkerOptimStep(ControlRequest):
    """Tinker ``optim_step``: queue it after the model's pending forward_backward requests."""

    Reply = Ack

    model_id: str
    request_id: str
    adam: AdamParams


class TinkerSave(ControlRequest):
    """Tinker ``save_weights`` (``kind="weights"``: the training state, durably) or
    ``save_weights_for_sampler`` (``"sampler_weights"``: the adapter in PEFT's format, for SGLang to
    serve), written to ``directory`` (``core.tinker.store``) between the model's requests."""

    Reply = Ack

    model_id: str
    kind: Literal["weights", "sampler_weights"]
    directory: str


class TinkerLoad(ControlRequest):
    """Tinker ``load_weights``: the training state saved in ``directory`` (its weights, and with
    ``optimizer`` its AdamW state), into ``model_id``; with ``create``, a new training client made from it
    (the SDK's ``create_training_client_from_state``), its adapter configured as the saved one was."""

    Reply = Ack

    model_id: str
    directory: str
    optimizer: bool = True
    create: bool = False


class TinkerDropModel(ControlRequest):
    """A training client whose session ended (closed, or silent past the heartbeat timeout): free its
    adapter and optimizer state; requests still queued on it fail."""

    Reply = Ack

    model_id: str


CONTROL_REQUESTS: tuple[type[ControlRequest], ...] = (
    SubmitJob,
    ListJobs,
    GetJob,
    CancelJob,
    GetStats,
    GetCapacity,
    AdapterServed,
    AdaptersToServe,
    TinkerCreateModel,
    TinkerForwardBackward,
    TinkerOptimStep,
    TinkerSave,
    TinkerLoad,
    TinkerDropModel,
)
AnyControlRequest = Union[CONTROL_REQUESTS]  # noqa: UP007 - a union built from the tuple


def decode_reply(request: ControlRequest, payload: bytes):
    """A successful reply's payload, as the request's ``Reply`` type."""
    return msgspec.json.decode(payload, type=type(request).Reply)
