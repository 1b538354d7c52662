"""The Tinker API's training clients on the scheduler side, without a server (``core.tinker.models`` over
``helpers.fake_scheduler``): each client is a work source whose requests run as units before a job's,
answered in order through the host; a request that fails fails alone; the bound on clients holds."""

import numpy as np
import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from helpers.fake_scheduler import FakeScheduler
from helpers.jobs import ALL_MODULES, RECORDS
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.errors import NotFound, TooManyJobs
from sglang_harli.core.jobs.spec import LoraSpec
from sglang_harli.core.tinker.models import MAX_MODELS
from sglang_harli.core.tinker.params import AdamParams
from sglang_harli.core.wire.control import (
    TinkerCreateModel,
    TinkerDropModel,
    TinkerForwardBackward,
    TinkerOptimStep,
)

LORA = LoraSpec(r=8, alpha=32, target_modules=["q_proj", "v_proj"])


def forward_backward(model_id: str, request_id: str, tokens: list[list[int]]) -> TinkerForwardBackward:
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
        )
        for ids in tokens
    ]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=0,
    )
    body = forward_backward_request_to_proto(request).SerializeToString()
    return TinkerForwardBackward(model_id=model_id, request_id=request_id, body=body)


@pytest.fixture
def fake(tiny_model_dir, tmp_path):
    return FakeScheduler(tiny_model_dir, HarliConfig(output_dir=str(tmp_path / "adapters")))


def test_a_clients_requests_run_before_a_jobs_units_and_answer_in_order(fake):
    fake.submit(
        {
            "name": "batch",
            "dataset": {"records": RECORDS[:8]},
            "lora": {"r": 8, "target_modules": ALL_MODULES},
            "training": {"epochs": 50, "micro_batch_size": 4},
        }
    )
    fake.run_until(lambda: fake.job("batch").step >= 1)  # the job is mid-run
    fake.call(TinkerCreateModel(model_id="s:train:0", lora=LORA, seed=3))
    fake.call(forward_backward("s:train:0", "fb", [[5, 6, 7, 8, 9], [10, 11, 12]]))
    fake.call(TinkerOptimStep(model_id="s:train:0", request_id="step", adam=AdamParams(learning_rate=1e-2)))
    job_tokens = {}
    answer = fake.host.answer

    def answered(request_id, outcome):  # what the job had trained when each answer went out
        job_tokens[request_id] = fake.job("batch").tokens_trained
        answer(request_id, outcome)

    fake.host.answer = answered
    before = fake.job("batch").tokens_trained
    fake.run_until(lambda: "step" in fake.host.answers)
    assert list(fake.host.answers) == ["fb", "step"]  # in the order they were queued
    assert job_tokens == {"fb": before, "step": before}  # the job trained nothing meanwhile
    outcome = fake.host.answers["fb"]
    assert outcome.error is None and outcome.media_type == "application/x-protobuf"
    output = deserialize_forward_backward_output(outcome.body)
    logprobs = [np.asarray(o["logprobs"].data) for o in output.loss_fn_outputs]
    assert [len(values) for values in logprobs] == [4, 2] and all(np.all(v < 0) for v in logprobs)
    assert output.metrics["loss:sum"] == pytest.approx(-sum(v.sum() for v in logprobs), rel=1e-5)
    assert fake.host.answers["step"].error is None
    fake.run_until(lambda: fake.job("batch").tokens_trained > before)  # and the job goes on after


def test_a_failing_request_fails_alone(fake, tiny_model_dir):
    fake.call(TinkerCreateModel(model_id="s:train:0", lora=LORA))
    vocab = fake.host.config.vocab_size
    fake.call(forward_backward("s:train:0", "bad", [[5, vocab + 7, 6]]))  # a token the model has not got
    fake.call(forward_backward("s:train:0", "good", [[5, 6, 7]]))
    fake.run_until(lambda: "good" in fake.host.answers)
    bad, good = fake.host.answers["bad"], fake.host.answers["good"]
    assert bad.error is not None and bad.category == "server"
    assert good.error is None


def test_clients_are_bounded_and_a_dropped_one_frees_its_place_and_fails_its_requests(fake):
    for i in range(MAX_MODELS):
        fake.call(TinkerCreateModel(model_id=f"s:train:{i}", lora=LORA))
    with pytest.raises(TooManyJobs) as refused:
        fake.call(TinkerCreateModel(model_id="s:train:9", lora=LORA))
    assert refused.value.field == "model_id" and refused.value.status == 429
    fake.call(forward_backward("s:train:0", "queued", [[5, 6, 7]]))
    fake.call(TinkerDropModel(model_id="s:train:0"))
    assert "session ended" in fake.host.answers["queued"].error
    with pytest.raises(NotFound):
        fake.call(forward_backward("s:train:0", "gone", [[5, 6, 7]]))
    fake.call(TinkerCreateModel(model_id="s:train:9", lora=LORA))
    assert not fake.finetuning.has_work
