"""tinker-cookbook's own recipes against a real server (a loop surviving a restart: ``test_durable``).

The server (the shared keyed server) serves the tiny model under a name the cookbook knows (its recipes pick
a renderer by the model's name), keeps its state under --harli-state-dir, and has API keys: the SDK's
``tml-`` key must pass SGLang's key check. The recipes run unchanged (``cookbook_recipe.py`` gives them local
data in place of their downloads), each in a process of its own, as a user runs them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
from tinker import types

from helpers.servers import ADMIN_KEY, KEYED_MODEL_NAME

MODEL_NAME = KEYED_MODEL_NAME
KEY = ADMIN_KEY  # Tinker routes are admin routes, like SGLang's /load_lora_adapter: the admin key opens them
RECIPE = Path(__file__).with_name("cookbook_recipe.py")


def _service(url, key=f"tml-{KEY}"):
    return tinker.ServiceClient(base_url=url, api_key=key)


def _recipe(server, tiny_model_dir, tmp_path, recipe, *config):
    log_path = tmp_path / recipe
    env = {**os.environ, "TINKER_API_KEY": f"tml-{KEY}", "OMP_NUM_THREADS": "1", "TINKER_TELEMETRY": "0"}
    command = [sys.executable, str(RECIPE), recipe, str(tiny_model_dir), f"base_url={server.url}",
               f"model_name={MODEL_NAME}", f"log_path={log_path}", "lora_rank=8", *config]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checkpoints = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    return checkpoints, metrics, done.stderr


def _sample(server, path, prompt=(5, 6, 7)):
    with _service(server.url) as service:
        sampler = service.create_sampling_client(model_path=path).result()
        params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
        return sampler.sample(types.ModelInput.from_ints(list(prompt)), 1, params).result().sequences[0]


def test_the_sdk_key_passes_sglangs_key_check(keyed_server):
    with pytest.raises(tinker.AuthenticationError):
        with _service(keyed_server.url, key="tml-wrong") as service:
            service.create_lora_training_client(base_model=MODEL_NAME, rank=8).result()


def test_the_cookbook_sl_loop_runs_to_completion(keyed_server, tiny_model_dir, tmp_path):
    checkpoints, metrics, _ = _recipe(
        keyed_server,
        tiny_model_dir,
        tmp_path,
        "sl_loop",
        "batch_size=4",
        "save_every=1",
        "learning_rate=1e-2",
    )
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["num_sequences"] == 4 and m["train_mean_nll"] > 0 for m in metrics)
    assert [c["name"] for c in checkpoints] == ["000001", "final"]
    final = checkpoints[-1]
    assert final["state_path"].endswith("/weights/final")
    assert len(_sample(keyed_server, final["sampler_path"]).tokens) == 4


def test_the_cookbook_rl_loop_runs_to_completion(keyed_server, tiny_model_dir, tmp_path):
    checkpoints, metrics, log = _recipe(
        keyed_server, tiny_model_dir, tmp_path, "rl_loop",
        "batch_size=2", "group_size=4", "max_tokens=8", "loss_fn=importance_sampling",
    )  # fmt: skip
    # every step saved a snapshot, sampled a group of 4 per question through it and scored them
    assert [m["step"] for m in metrics] == [0, 1]
    assert all("reward/total" in m for m in metrics)
    assert "Sampling batch 1" in log
    assert checkpoints[-1]["name"] == "final" and checkpoints[-1]["sampler_path"]
