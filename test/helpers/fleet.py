"""Fleet instances for the server tests: each with the fleet's admin key and one thread (two torch
processes on two cores)."""

from sglang_harli.server_process import ServerProcess

KEY = "fleet-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def instance(tmp_path, tiny_model_dir, name, port, peers):
    args = [
        "--model-path", str(tiny_model_dir), "--enable-lora", "--max-lora-rank", "16",
        "--lora-target-modules", "all", "--admin-api-key", KEY, "--harli-peers", peers,
        "--harli-output-dir", str(tmp_path / name / "adapters"),
    ]  # fmt: skip
    return ServerProcess(args, tmp_path / f"{name}.log", port=port, env={"OMP_NUM_THREADS": "1"})
