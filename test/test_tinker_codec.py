"""The Tinker API's binary messages (``core.tinker.codec``), checked against the SDK itself: requests
the SDK builds decode to the same tokens and tensors, and results encoded here decode with the SDK's own
decoders to what was meant; bad datums are refused naming the field."""

import numpy as np
import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from sglang_harli.core.errors import SpecError
from sglang_harli.core.tinker.codec import (
    Sequence,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
)


def _request(data, loss_fn="cross_entropy", config=None, seq_id=3):
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="sess:train:0",
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def _datum(tokens, **inputs):
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def test_an_sdk_request_decodes_to_its_tokens_and_tensors():
    body = _request(
        [
            _datum([5, 6, 7], target_tokens=[6, 7, 8], weights=[0.0, 1.0, 1.0]),
            _datum([9, 10], target_tokens=[10, 2]),
        ],
        config={"clip": 0.2},
    )
    request = decode_forward_backward(body)
    assert (request.model_id, request.seq_id, request.loss_fn, request.forward_only) == (
        "sess:train:0",
        3,
        "cross_entropy",
        False,
    )
    assert request.config == {"clip": pytest.approx(0.2)}
    first, second = request.data
    assert first.tokens.tolist() == [5, 6, 7] and first.inputs["target_tokens"].tolist() == [6, 7, 8]
    assert first.inputs["weights"].tolist() == [0.0, 1.0, 1.0]
    assert second.inputs["weights"].tolist() == [1.0, 1.0]  # cross_entropy's default
    assert request.tokens == 5


def test_bad_datums_are_refused_naming_the_field():
    with pytest.raises(SpecError) as missing:
        decode_forward_backward(
            _request([_datum([1, 2], target_tokens=[2, 3])], loss_fn="importance_sampling")
        )
    assert missing.value.field == "data[0].loss_fn_inputs.logprobs"
    with pytest.raises(SpecError) as shape:
        decode_forward_backward(_request([_datum([1, 2]), _datum([1, 2, 3], target_tokens=[2, 3])]))
    assert shape.value.field in (
        "data[0].loss_fn_inputs.target_tokens",
        "data[1].loss_fn_inputs.target_tokens",
    )
    with pytest.raises(SpecError) as loss:
        decode_forward_backward(_request([_datum([1], target_tokens=[2])], loss_fn="ppo"))
    assert loss.value.field == "loss_fn"
    with pytest.raises(SpecError) as garbage:
        decode_forward_backward(b"\xff\xff\xff")
    assert garbage.value.field == "body"


def test_outputs_decode_with_the_sdks_own_decoders():
    body = encode_forward_backward_output(
        [np.array([-0.5, -1.25], np.float32), np.array([-2.0], np.float32)], {"loss:sum": 3.75}
    )
    output = deserialize_forward_backward_output(body)
    assert output.metrics == {"loss:sum": 3.75}
    assert [o["logprobs"].data for o in output.loss_fn_outputs] == [[-0.5, -1.25], [-2.0]]
    assert output.loss_fn_outputs[0]["logprobs"].dtype == "float32"
    with pytest.raises(ValueError):
        encode_forward_backward_output([], {"loss": 1.0})

    sample = deserialize_sample_response(
        encode_sample_response(
            [
                Sequence(tokens=[4, 5], logprobs=[-0.1, -0.2], stopped=True),
                Sequence(tokens=[6], logprobs=[-1.0], stopped=False),
            ],
            prompt_logprobs=[None, -0.5],
        )
    )
    assert [s.tokens for s in sample.sequences] == [[4, 5], [6]]
    assert [s.stop_reason for s in sample.sequences] == ["stop", "length"]
    assert sample.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert sample.prompt_logprobs == [None, -0.5]
