"""The launched server speaks native SGLang, token-exact with transformers, and counts its decode steps."""

import json

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The river town woke slowly on the first cold morning",
    "Question: How many days are in a week? Answer:",
    "def add(a, b):",
    "Memory is shared between the cache and the trainer.",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def generate(prompt: str, max_new_tokens: int = MAX_NEW) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1] :].tolist()

    return generate


def greedy(max_new_tokens: int = MAX_NEW) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": 0}


def test_health(server):
    assert server.get("/health").status_code == 200


def test_greedy_matches_transformers(server, reference):
    for prompt in PROMPTS:
        out = server.post("/generate", {"text": prompt, "sampling_params": greedy()}).json()
        assert out["output_ids"] == reference(prompt), prompt


def test_batch_input(server, reference):
    outs = server.post("/generate", {"text": PROMPTS, "sampling_params": greedy()}).json()
    assert [o["output_ids"] for o in outs] == [reference(p) for p in PROMPTS]


def test_streaming_sse(server, reference):
    body = {"text": PROMPTS[0], "sampling_params": greedy(), "stream": True}
    events = []
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1
    assert chunks[-1]["output_ids"] == reference(PROMPTS[0])


def test_openai_completions(server, reference):
    body = {"model": "harli-tiny", "prompt": PROMPTS[1], "max_tokens": MAX_NEW, "temperature": 0}
    resp = server.post("/v1/completions", body).json()
    tok = AutoTokenizer.from_pretrained(server_model_dir(server))
    expected = tok.decode(reference(PROMPTS[1]), skip_special_tokens=True)
    assert resp["choices"][0]["text"] == expected
    assert resp["usage"]["completion_tokens"] == MAX_NEW


def test_openai_chat_completions(server, tiny_model_dir, reference):
    messages = [{"role": "user", "content": "Can you write a short poem about the sea?"}]
    body = {"model": "harli-tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
    resp = server.post("/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already starts with <|bos|>; SGLang does not add a second one for chat.
    expected_ids = reference_from_ids(tiny_model_dir, tok(prompt, add_special_tokens=False).input_ids, 8)
    assert choice["message"]["content"] == tok.decode(expected_ids, skip_special_tokens=True)


def reference_from_ids(model_dir, ids, max_new_tokens):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def server_model_dir(server):
    return server.get("/model_info").json()["model_path"]


def test_harli_stats_move_with_traffic(server):
    before = server.get("/harli/stats").json()
    assert before["config"]["tpot_slo_ms"] == 100.0
    server.post("/generate", {"text": ["a", "b", "c"], "sampling_params": greedy(10)})
    after = server.get("/harli/stats").json()
    # Three requests of 10 tokens: the first token of each comes from prefill, the other 9 from decode.
    assert after["decode_tokens"] - before["decode_tokens"] == 27
    assert after["decode_steps"] - before["decode_steps"] >= 9
    assert after["prefill_steps"] > before["prefill_steps"]
    latency = after["decode_step_latency"]
    assert latency["count"] >= 9
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert 0.0 <= latency["slo_attainment"] <= 1.0
