import hashlib
import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from sglang_harli.models.builtin import PRESETS, is_preset_path, materialize, preset_name, resolve_model_path


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_across_caches(tmp_path):
    a = materialize("tiny", root=tmp_path / "a")
    b = materialize("tiny", root=tmp_path / "b")
    assert a.name == b.name
    assert _digest(a) == _digest(b)
    assert materialize("tiny", root=tmp_path / "a") == a  # second call reuses the cache


def test_tiny_is_a_loadable_llama_with_a_trained_tokenizer(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == config.vocab_size == PRESETS["tiny"].vocab_size
    text = "The river town woke slowly."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) < len(text) // 2  # BPE merges were learned from the corpus
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_qwen2_preset_has_biases(tmp_path):
    path = materialize("tiny-qwen2", root=tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]


def test_preset_paths():
    assert is_preset_path("harli:tiny") and not is_preset_path("/models/llama")
    assert resolve_model_path("/models/llama") == "/models/llama"
    with pytest.raises(ValueError, match="harli:tiny"):
        preset_name("harli:huge")
