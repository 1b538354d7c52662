"""The official ``tinker`` SDK (0.38.0) drives the real server: a LoRA training client created over the
served weights, forward_backward (cross_entropy) and optim_step rounds that lower the loss, the returned
logprobs consistent with the reported loss, and ``/generate`` requests served alongside."""

import numpy as np
import pytest
import requests
import tinker
from tinker import types


def _datums(count=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(3, 200, size=length + 1).tolist()
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return out


@pytest.fixture
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-harli")
    yield client


def test_the_sdk_trains_a_lora_through_the_api(server, service, tiny_model_dir):
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8).result()
    datums = _datums()
    losses = []
    for _ in range(20):
        forward_backward = training.forward_backward(datums, "cross_entropy")
        step = training.optim_step(types.AdamParams(learning_rate=1e-2))
        out = forward_backward.result()
        step.result()
        logprobs = [o["logprobs"].data for o in out.loss_fn_outputs]
        assert [len(lp) for lp in logprobs] == [12] * 4
        assert -sum(map(sum, logprobs)) == pytest.approx(out.metrics["loss:sum"], rel=1e-4)
        losses.append(out.metrics["loss:sum"])
    assert losses[-1] < 0.5 * losses[0], losses
    # decode keeps serving
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    assert requests.post(f"{server.url}/generate", json=body, timeout=60).status_code == 200


def test_a_bad_datum_is_refused_naming_the_field(service, tiny_model_dir):
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8).result()
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={"target_tokens": [6, 7]}
    )
    with pytest.raises(tinker.BadRequestError) as refused:
        training.forward_backward([bad], "cross_entropy").result()
    assert "data[0].loss_fn_inputs.target_tokens" in str(refused.value)
