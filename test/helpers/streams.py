"""Streaming decode load for the co-location tests: greedy requests over the streaming API."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from helpers.jobs import PROMPTS

LOAD_ROUNDS = 3
MAX_NEW = 32


def stream(server, prompt, headers=None):
    """Greedy generation over the streaming API; returns token ids and client-side token gaps."""
    body = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
    }
    ids, gaps, last = [], [], None
    with requests.post(
        f"{server.url}/generate", json=body, stream=True, timeout=120, headers=headers
    ) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            ids = chunk["output_ids"]
    return ids, gaps


def decode_load(server, stagger_s: float = 0.0, headers=None):
    """Eight clients, each streaming a few prompts back to back; client ``i`` starts ``i * stagger_s``
    late, so that (with a stagger) requests arrive while others are decoding."""

    def client(index):
        time.sleep(index * stagger_s)
        prompts = [PROMPTS[(index + r) % len(PROMPTS)] for r in range(LOAD_ROUNDS)]
        return [stream(server, prompt, headers)[0] for prompt in prompts]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(client, range(8)))
