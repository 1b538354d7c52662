"""A server with a small KV pool, for the lending tests, and what they read of it."""

from helpers.servers import SERVER_ARGS
from sglang_harli.server_process import ServerProcess

POOL = 8192  # tokens of 2 KiB each (tiny model, fp32): 16 MiB
BUDGET_MB = 1  # the tiny model's micro-batch saves about 5 MiB: it cannot train on this budget alone
BURST, BURST_NEW = 12, 600  # prompts of about 6 tokens: 12 x ~606 tokens is ~90% of the pool


def lending_server(tmp_path, *extra):
    args = [
        *SERVER_ARGS,
        "--enable-metrics",
        "--max-total-tokens",
        str(POOL),
        "--harli-trainer-memory-mb",
        str(BUDGET_MB),
        "--harli-kv-poison",
        "--harli-output-dir",
        str(tmp_path / "adapters"),
        *extra,
    ]
    return ServerProcess(args, tmp_path / "server.log")


def memory(server):
    return server.get("/harli/stats").json()["finetune"]["memory"]


def metric(server, name):
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
