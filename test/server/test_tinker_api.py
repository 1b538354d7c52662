"""The official ``tinker`` SDK (0.38.0) drives the real server (the shared ``server`` fixture): a LoRA
training client over the served weights, forward_backward and optim_step rounds that lower the loss, the
returned logprobs equal to an independent PEFT model with the saved adapter, the snapshot sampled hot
returning the trained continuation, an RL step by importance sampling, and ``/generate`` requests served
alongside with the outputs they had before and within the SLO."""

import statistics
import threading
import time

import numpy as np
import pytest
import requests
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from sglang_harli.srt.tinker.snapshots import MAX_SERVED_SNAPSHOTS

PROMPT = [5, 6, 7, 8]
CONTINUATION = [40, 41, 42, 43]
SLO_S = 0.1  # the server's --harli-tpot-slo-ms default


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


def _continuation_datum():
    tokens = PROMPT + CONTINUATION
    weights = [0.0] * (len(PROMPT) - 1) + [1.0] * len(CONTINUATION)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


@pytest.fixture
def service(server):
    with tinker.ServiceClient(base_url=server.url, api_key="tml-harli") as client:  # closed: places freed
        yield client


class _Decode:
    """Greedy ``/generate`` requests sent one after another while a Tinker loop trains."""

    BODY = {"text": "the quick brown", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}

    def __init__(self, url):
        self.url, self.outputs, self.per_token_s = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def one(self):
        start = time.monotonic()
        reply = requests.post(f"{self.url}/generate", json=self.BODY, timeout=60)
        assert reply.status_code == 200, reply.text
        out = reply.json()
        tokens = out["meta_info"]["completion_tokens"]
        return out["output_ids"], (time.monotonic() - start) / tokens

    def _run(self):
        while not self._stop.is_set():
            ids, per_token = self.one()
            self.outputs.append(ids)
            self.per_token_s.append(per_token)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


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


def test_the_trained_snapshot_samples_hot_while_decode_keeps_its_outputs_and_slo(
    server, service, tiny_model_dir
):
    decode = _Decode(server.url)
    reference = decode.one()[0]
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8).result()
    datum = _continuation_datum()
    with decode:
        for _ in range(80):
            forward_backward = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            loss = forward_backward.result().metrics["loss:sum"]
        sampler = training.save_weights_and_get_sampling_client().result()
        greedy = types.SamplingParams(max_tokens=len(CONTINUATION), temperature=0.0, stop=[])
        sampled = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, greedy).result()
    assert loss < 0.05, loss
    # decode kept serving what it served before, within the SLO, all through the loop
    assert len(decode.outputs) >= 5 and all(ids == reference for ids in decode.outputs)
    assert statistics.median(decode.per_token_s) < SLO_S, decode.per_token_s
    # the snapshot serves the trained continuation, each sample named by the submission
    assert [s.tokens for s in sampled.sequences] == [CONTINUATION, CONTINUATION]
    assert len({s.sequence_id for s in sampled.sequences}) == 2
    assert all(s.stop_reason == "length" for s in sampled.sequences)

    # logprobs: the trainer's (forward), SGLang's serving the snapshot, and an independent PEFT model
    trained = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    served = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + CONTINUATION)).result()
    assert served[0] is None and served[1:] == pytest.approx(trained, abs=1e-4)
    assert sampled.sequences[0].logprobs == pytest.approx(trained[len(PROMPT) - 1 :], abs=1e-4)

    path = training.save_weights_for_sampler("continuation").result().path
    assert path.endswith("/sampler_weights/continuation")
    run, _, name = path.removeprefix("tinker://").split("/")
    snapshot = server.log_path.parent / "adapters" / "tinker" / run / "sampler_weights" / name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, snapshot).eval()
    tokens = torch.tensor([PROMPT + CONTINUATION])
    with torch.no_grad():
        logits = peft(tokens[:, :-1]).logits.float().log_softmax(-1)[0]
    reference_logprobs = logits.gather(1, tokens[0, 1:, None])[:, 0].tolist()
    assert trained == pytest.approx(reference_logprobs, abs=1e-4)

    # a named snapshot is sampled through a sampling session of its own, as the cookbook does
    named = service.create_sampling_client(model_path=path).result()
    again = named.sample(types.ModelInput.from_ints(PROMPT), 1, greedy).result()
    assert again.sequences[0].tokens == CONTINUATION


def test_an_rl_step_by_importance_sampling(service, tiny_model_dir):
    """Sample from the policy, reward the samples that begin with the group's lowest token id, train on
    them with their sampler logprobs: the importance-sampling loss goes down, and the rewarded samples gain
    logprob over the others."""
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=7, stop=[])
    sampler = training.save_weights_and_get_sampling_client().result()
    groups = sampler.sample(prompt, 8, params).result().sequences
    lowest = min(s.tokens[0] for s in groups)
    rewards = [float(s.tokens[0] == lowest) for s in groups]  # mixed unless all 8 drew the same token
    assert 0 < sum(rewards) < len(rewards), [s.tokens for s in groups]  # a mixed group
    mean = sum(rewards) / len(rewards)
    datums = []
    for sequence, reward in zip(groups, rewards, strict=True):
        pad = len(PROMPT) - 1
        datums.append(
            types.Datum(
                model_input=prompt.append(types.EncodedTextChunk(tokens=sequence.tokens[:-1])),
                loss_fn_inputs={
                    "target_tokens": [0] * pad + sequence.tokens,
                    "logprobs": [0.0] * pad + sequence.logprobs,
                    "advantages": [0.0] * pad + [reward - mean] * len(sequence.tokens),
                },
            )
        )
    before = training.forward_backward(datums, "importance_sampling").result()
    training.optim_step(types.AdamParams(learning_rate=3e-4)).result()
    # on-policy, the ratio is 1: the learner's logprobs of the sampled tokens are the sampler's
    for datum_out, sequence in zip(before.loss_fn_outputs, groups, strict=True):
        assert datum_out["logprobs"].data[len(PROMPT) - 1 :] == pytest.approx(sequence.logprobs, abs=1e-4)
    after = training.forward(datums, "importance_sampling").result()

    def advantage_weighted(out):  # what the step climbs, to first order: sum of advantage * logprob
        pad = len(PROMPT) - 1
        return sum(
            (reward - mean) * sum(o["logprobs"].data[pad:])
            for o, reward in zip(out.loss_fn_outputs, rewards, strict=True)
        )

    assert after.metrics["loss:sum"] < before.metrics["loss:sum"]
    assert advantage_weighted(after) > advantage_weighted(before)


def test_bad_requests_are_refused_naming_the_field(server, service, tiny_model_dir):
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8).result()
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={"target_tokens": [6, 7]}
    )
    with pytest.raises(tinker.BadRequestError) as refused:
        training.forward_backward([bad], "cross_entropy").result()
    assert "data[0].loss_fn_inputs.target_tokens" in str(refused.value)
    with pytest.raises(tinker.BadRequestError, match="lora_config.rank"):
        service.create_lora_training_client(base_model=str(tiny_model_dir), rank=64).result()
    with pytest.raises(tinker.BadRequestError, match="base_model"):
        service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=8).result()
    with pytest.raises(tinker.NotFoundError, match="model_path"):
        service.create_sampling_client(model_path="tinker://nobody:train:0/sampler_weights/x").result()

    # the training clients a server keeps are bounded: beyond them, 429 naming the field
    session = requests.post(f"{server.url}/api/v1/create_session", json={}, timeout=30).json()["session_id"]
    codes = []
    for number in range(5):
        body = {"session_id": session, "model_seq_id": number, "base_model": str(tiny_model_dir),
                "lora_config": {"rank": 4}}  # fmt: skip
        reply = requests.post(f"{server.url}/api/v1/create_model", json=body, timeout=30)
        codes.append(reply.status_code)
    assert codes[-1] == 429 and reply.json()["field"] == "model_id", codes
    finish = requests.post(f"{server.url}/api/v1/sessions/{session}/finish", json={}, timeout=30)
    assert finish.status_code == 200
    # the session's places are free again
    service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8).result()


def test_snapshots_beyond_the_bound_are_unloaded_least_recently_sampled_first(service, tiny_model_dir):
    training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    prompt, params = types.ModelInput.from_ints(PROMPT), types.SamplingParams(max_tokens=2, temperature=0.0)
    named = service.create_sampling_client(model_path=training.save_weights_for_sampler("kept").result().path)
    named = named.result()
    named.sample(prompt, 1, params).result()
    samplers = [training.save_weights_and_get_sampling_client().result() for _ in range(MAX_SERVED_SNAPSHOTS)]
    for sampler in samplers[1:]:
        sampler.sample(prompt, 1, params).result()
    # the named snapshot and the first unnamed one were the least recently sampled: both were unloaded.
    # The named one is on disk and loads again; the unnamed one went with its load.
    assert len(named.sample(prompt, 1, params).result().sequences) == 1
    with pytest.raises(tinker.RequestFailedError, match="evicted"):
        samplers[0].sample(prompt, 1, params).result()
