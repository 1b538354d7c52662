"""A PEFT adapter made here is hot-loaded into the running server and served token-exact with PEFT."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The river town woke slowly", "User: Please summarise the report in one sentence."]
MAX_NEW = 12


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random, non-zero B: the adapter really changes the outputs
    )
    model = get_peft_model(base, config)
    path = tmp_path_factory.mktemp("adapter") / "memo"
    model.save_pretrained(path)
    return path


def _greedy_ids(model, tok, prompt):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapter_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_ids = [_greedy_ids(base, tok, p) for p in PROMPTS]
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    lora_ids = [_greedy_ids(peft_model, tok, p) for p in PROMPTS]
    assert base_ids != lora_ids, "the test adapter must change the continuation"
    return base_ids, lora_ids


def _generate(server, prompts, lora_path):
    body = {
        "text": prompts,
        "lora_path": lora_path,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0},
    }
    resp = server.post("/generate", body)
    assert resp.status_code == 200, resp.text
    return [o["output_ids"] for o in resp.json()]


def test_hot_load_serve_mixed_batch_and_unload(server, adapter_dir, expected):
    base_ids, lora_ids = expected
    resp = server.post("/load_lora_adapter", {"lora_name": "memo", "lora_path": str(adapter_dir)})
    assert resp.status_code == 200 and resp.json()["success"], resp.text

    assert _generate(server, PROMPTS, ["memo", "memo"]) == lora_ids
    mixed = _generate(server, PROMPTS, ["memo", None])
    assert mixed == [lora_ids[0], base_ids[1]]
    assert _generate(server, PROMPTS, [None, "memo"]) == [base_ids[0], lora_ids[1]]

    resp = server.post("/unload_lora_adapter", {"lora_name": "memo"})
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    assert "memo" not in resp.json()["loaded_adapters"]  # finetune jobs' adapters may share this server
    assert _generate(server, PROMPTS, None) == base_ids
    # SGLang 0.5.23 remembers every name it ever loaded (it may reload an unloaded adapter from its path on
    # demand), so a name that was never loaded is the one that is refused.
    never = server.post("/generate", {"text": PROMPTS[0], "lora_path": "never-loaded"})
    assert never.status_code == 400 and "never-loaded" in never.text
