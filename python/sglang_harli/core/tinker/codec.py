"""The Tinker API's binary messages, read and written with the SDK's own protobuf definitions.

Two results travel as protobuf and nothing else (the SDK refuses JSON for them): ``ForwardBackwardOutput``
(per-datum ``logprobs`` and metrics) and ``SampleResponse`` (sampled tokens and their logprobs); and one
request does, ``ForwardBackwardRequest`` (datums as token chunks and named tensors, optionally zstd).
The message classes are ``tinker.proto.tinker_public_pb2`` from the pinned ``tinker`` SDK, never a copy:
a field the SDK adds or renames then shows up here as a failing test, not as a silent mismatch.

Decoding checks what a loss needs and refuses a bad datum with ``SpecError`` naming it
(``data[3].loss_fn_inputs.weights``); the Tinker routes turn that into the protocol's ``user`` error.
Conventions (the SDK's and the cookbook's): position ``i`` of a datum's tokens predicts
``target_tokens[i]``, every per-position input has the tokens' length, and ``loss:sum`` is the summed
loss, so metric keys carry exactly one ``:`` (the SDK splits on it to merge chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from sglang_harli.core.errors import SpecError

LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
}
"""The loss functions served, and the inputs each needs (``cross_entropy``'s ``weights`` default to 1)."""
_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


@dataclass(frozen=True)
class Datum:
    tokens: np.ndarray
    """int64 (T,): the model input."""
    inputs: dict[str, np.ndarray]
    """The loss's inputs, each (T,): ``target_tokens`` int64; ``weights``, ``logprobs``, ``advantages``
    float32."""


@dataclass(frozen=True)
class ForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    config: dict[str, float | str]
    data: list[Datum]

    @property
    def tokens(self) -> int:
        return sum(len(datum.tokens) for datum in self.data)


def decode_forward_backward(body: bytes) -> ForwardBackward:
    """A ``ForwardBackwardRequest`` body (inflated already, within its limit: ``srt.body``), checked against
    what its loss needs."""
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError
        raise SpecError("body", f"not a ForwardBackwardRequest: {exc}") from None
    if message.loss_fn not in LOSS_INPUTS:
        raise SpecError("loss_fn", f"{message.loss_fn!r} is not served; these are: {sorted(LOSS_INPUTS)}")
    if not message.data:
        raise SpecError("data", "is empty")
    config: dict[str, float | str] = {
        key: value.number if value.WhichOneof("value") == "number" else value.text
        for key, value in message.loss_fn_config_v2.items()
    } or dict(message.loss_fn_config)
    data = [_datum(datum, i, message.loss_fn) for i, datum in enumerate(message.data)]
    return ForwardBackward(
        model_id=message.model_id,
        seq_id=message.seq_id,
        loss_fn=message.loss_fn,
        forward_only=message.forward_only,
        config=config,
        data=data,
    )


def _datum(message: pb.Datum, index: int, loss_fn: str) -> Datum:
    where = f"data[{index}]"
    parts = []
    for chunk in message.model_input:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise SpecError(f"{where}.model_input", "only token chunks (encoded_text) are served")
        parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    if tokens.size == 0:
        raise SpecError(f"{where}.model_input", "has no tokens")
    inputs = {
        name: _tensor(tensor, f"{where}.loss_fn_inputs.{name}")
        for name, tensor in message.loss_fn_inputs.items()
    }
    for name in LOSS_INPUTS[loss_fn]:
        if name not in inputs:
            raise SpecError(f"{where}.loss_fn_inputs.{name}", f"is required by {loss_fn}")
    inputs.setdefault("weights", np.ones(tokens.size, np.float32))
    for name, value in inputs.items():
        if value.shape != tokens.shape:
            raise SpecError(
                f"{where}.loss_fn_inputs.{name}",
                f"has shape {list(value.shape)}; the input has {tokens.size} tokens",
            )
    inputs["target_tokens"] = inputs["target_tokens"].astype(np.int64)
    return Datum(tokens=tokens, inputs=inputs)


def _tensor(message: pb.Tensor, where: str) -> np.ndarray:
    if message.WhichOneof("encoding") != "dense":
        raise SpecError(where, "sparse tensors are not served; send a dense one")
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise SpecError(where, f"dtype {pb.DType.Name(message.dtype)} is not served")
    values = np.frombuffer(message.dense, dtype=np.dtype(dtype).newbyteorder("<"))
    shape = list(message.shape) or [values.size]
    if int(np.prod(shape)) != values.size:
        raise SpecError(where, f"holds {values.size} values, not the {shape} its shape says")
    values = values.reshape(shape)
    return values.astype(np.float32) if dtype is np.float32 else values.astype(np.int64)


def encode_forward_backward_output(logprobs: list[np.ndarray], metrics: dict[str, float]) -> bytes:
    """``ForwardBackwardOutput``: each datum's target-token ``logprobs`` (float32, its tokens' length)."""
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(f"metric {key!r} must be name:reduction (the SDK splits on ':')")
    output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=metrics)
    record = output.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(logprobs))
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    arrays = [np.asarray(values, dtype="<f4") for values in logprobs]
    field.data = b"".join(array.tobytes() for array in arrays)
    field.offsets = np.cumsum([0] + [array.nbytes for array in arrays]).astype("<i8").tobytes()
    return output.SerializeToString()


@dataclass(frozen=True)
class Sequence:
    tokens: list[int]
    logprobs: list[float]
    stopped: bool
    """Ended on a stop token or string (else on ``max_tokens``)."""


def encode_sample_response(
    sequences: list[Sequence], prompt_logprobs: list[float | None] | None = None
) -> bytes:
    """``SampleResponse``: one sequence per sample, in the order of the submission's sequence ids."""
    response = pb.SampleResponse()
    for sequence in sequences:
        response.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if sequence.stopped else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(sequence.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(sequence.logprobs, dtype="<f4").tobytes(),
        )
    if prompt_logprobs is not None:
        values = [np.nan if value is None else value for value in prompt_logprobs]
        response.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    return response.SerializeToString()
