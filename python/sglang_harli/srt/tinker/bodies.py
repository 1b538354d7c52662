"""The Tinker API's JSON request bodies, typed: what each ``/api/v1`` route reads from what the SDK sends.

Each route decodes its body into one of these structs (``srt.body.decode``): a wrong type, a missing
field or a value out of range is refused with 422 naming the field's JSON path, before anything runs. The
fields are the pinned SDK's (``tinker.types``, 0.38.0), under the SDK's names. Fields the SDK sends and
the server does not read (``type``, ``user_metadata``, ``ttl_seconds``, ``optimizer_config``, ...) are
ignored, not refused: the SDK adds fields from release to release, and its requests must keep working.
``forward_backward`` is the one body that is not JSON: a protobuf ``ForwardBackwardRequest``, decoded and
checked with the SDK's own message definitions (``core.tinker.codec``).

The same structs describe the routes in the server's OpenAPI document (``srt.openapi``), so the document
and the server cannot disagree about what is accepted.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sglang_harli.core.tinker.params import AdamParams as CoreAdamParams

SESSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?!\n)$"
"""A session id is a path component of every id and saved path under it (``<session>:train:<n>``), so it
holds no separator; ``create_session`` makes ``sess-<hex>``. ``(?!\\n)``: Python's ``$`` also matches
before a trailing newline; the pattern is valid ECMAScript too, for the OpenAPI document."""
INT64_MAX = 2**63 - 1

SessionId = Annotated[str, Meta(pattern=SESSION_PATTERN, description="A session, from create_session.")]
SeqId = Annotated[int, Meta(ge=0, le=INT64_MAX)]
ModelId = Annotated[str, Meta(description="A training client, `<session_id>:train:<model_seq_id>`.")]
Seed = Annotated[int, Meta(ge=-(2**63), le=INT64_MAX)]
"""A seed torch takes (any int64)."""
Unit = Annotated[float, Meta(ge=0, lt=1)]


class Body(msgspec.Struct, kw_only=True, frozen=True):
    """A Tinker request body. Fields the server does not read are ignored."""


# -- start-up and sessions ---------------------------------------------------------------------------------
class ClientConfig(Body):
    """``client/config`` and ``client/dynamic_config``: the SDK's version (the flags do not depend on it)."""

    sdk_version: str | None = None


class CreateSession(Body):
    """``create_session``: the SDK's tags, metadata and version; none of them is read."""


class Telemetry(Body):
    """``telemetry``: the SDK's events, accepted and dropped."""


class FinishSession(Body):
    """``sessions/{session_id}/finish``: why the SDK closed the session; not read."""


class Heartbeat(Body):
    session_id: SessionId


class RetrieveFuture(Body):
    request_id: Annotated[str, Meta(description="The request_id an operation answered with.")]


# -- training clients --------------------------------------------------------------------------------------
class LoraConfig(Body):
    """The adapter of a new training client (alpha is the server's, ``srt.tinker.training.LORA_ALPHA``)."""

    rank: Annotated[int, Meta(ge=1, description="LoRA rank; at most the server's --max-lora-rank.")] = 32
    seed: Seed | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    """Accepted; the unembedding is never trained (a served SGLang adapter has no LoRA on it)."""


class CreateModel(Body):
    session_id: SessionId
    model_seq_id: SeqId
    base_model: Annotated[str | None, Meta(description="The model this server serves.")] = None
    lora_config: LoraConfig | None = None


class GetInfo(Body):
    model_id: ModelId


class AdamParams(Body):
    """One AdamW step (decoupled weight decay), as the SDK's ``AdamParams``."""

    learning_rate: Annotated[float, Meta(ge=0)] = 1e-4
    beta1: Unit = 0.9
    beta2: Unit = 0.95
    eps: Annotated[float, Meta(ge=0)] = 1e-12
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    grad_clip_norm: Annotated[
        float, Meta(ge=0, description="Clip the gradient norm to this; 0: no clip.")
    ] = 0.0

    def params(self) -> CoreAdamParams:
        return CoreAdamParams(**msgspec.structs.asdict(self))


class OptimStep(Body):
    model_id: ModelId
    seq_id: SeqId
    adam_params: Annotated[
        AdamParams | None, Meta(description="Required: AdamW is the one optimizer served.")
    ] = None


class SaveWeights(Body):
    """``save_state(name)``: the training state as ``tinker://<model_id>/weights/<path>``."""

    model_id: ModelId
    seq_id: SeqId
    path: Annotated[str | None, Meta(description="The name to save under (letters, digits, . _ -).")] = None
    overwrite: bool = False


class SaveWeightsForSampler(Body):
    """A snapshot to sample: named (``path``), or unnamed with a sampling session of its own."""

    model_id: ModelId
    seq_id: SeqId
    path: Annotated[str | None, Meta(description="The name to save under; none: an unnamed snapshot.")] = None
    sampling_session_seq_id: Annotated[
        SeqId | None, Meta(description="Required for an unnamed snapshot: its sampling session's number.")
    ] = None


class LoadWeights(Body):
    """A saved training state: into ``model_id`` (with ``seq_id``), or as a new training client (with
    ``session_id`` and ``model_seq_id``, the SDK's ``create_training_client_from_state``)."""

    path: Annotated[str, Meta(description="A tinker://<model_id>/weights/<name> path, from save_weights.")]
    optimizer: Annotated[bool, Meta(description="Restore AdamW's state too.")] = False
    model_id: ModelId | None = None
    seq_id: SeqId | None = None
    session_id: SessionId | None = None
    model_seq_id: SeqId | None = None
    base_model: str | None = None


# -- sampling ----------------------------------------------------------------------------------------------
class CreateSamplingSession(Body):
    session_id: SessionId
    sampling_session_seq_id: SeqId
    base_model: str | None = None
    model_path: Annotated[
        str | None,
        Meta(description="A tinker://<model_id>/sampler_weights/<name> path; none: the base model."),
    ] = None


class EncodedText(Body):
    tokens: list[Annotated[int, Meta(ge=0)]]
    type: Literal["encoded_text"] = "encoded_text"
    """Only token chunks are served (no images)."""


class ModelInput(Body):
    chunks: Annotated[list[EncodedText], Meta(min_length=1)]


class SamplingParams(Body):
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    seed: Seed | None = None
    stop: Annotated[
        str | list[str | int] | None,
        Meta(description="Absent: stop at EOS; []: never stop; strings or token ids: stop at them."),
    ] = None
    temperature: Annotated[float, Meta(ge=0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1, description="-1: the whole vocabulary.")] = -1
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0


class Sample(Body):
    """``asample`` (``SamplingClient.sample`` and ``compute_logprobs``)."""

    sampling_session_id: Annotated[str, Meta(description="From create_sampling_session.")]
    seq_id: SeqId
    prompt: ModelInput
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    num_samples: Annotated[int, Meta(ge=1, le=128)] = 1
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Annotated[int, Meta(ge=0, description="Not served: leave it 0.")] = 0
    topk_sample_logprobs: Annotated[int, Meta(ge=0, description="Not served: leave it 0.")] = 0
    prompt_alt_tokens_k: Annotated[int, Meta(ge=0, description="Not served: leave it 0.")] = 0
    target_prompt_logprobs: Annotated[dict | None, Meta(description="Not served.")] = None
    prompt_logprobs_last_n: Annotated[int | None, Meta(description="Not served.")] = None


BODIES: tuple[type[Body], ...] = (
    ClientConfig, CreateSession, Telemetry, FinishSession, Heartbeat, RetrieveFuture, CreateModel,
    GetInfo, OptimStep, SaveWeights, SaveWeightsForSampler, LoadWeights, CreateSamplingSession, Sample,
)  # fmt: skip
"""Every JSON body, for the OpenAPI document."""
