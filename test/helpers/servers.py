"""The flags the server tests start servers with."""

SERVER_ARGS = [
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--lora-target-modules",
    "all",
    "--max-loras-per-batch",
    "4",
]


# A PD-disaggregated decode instance with no prefill instance: SGLang's fake transfer backend, and requests
# carrying FAKE_BOOTSTRAP (SGLang's FAKE_BOOTSTRAP_HOST) and a bootstrap_room.
PD_DECODE_ARGS = [
    "--disaggregation-mode",
    "decode",
    "--disaggregation-transfer-backend",
    "fake",
    "--disaggregation-decode-retraction-backup",
    "cpu_tensor",
]
FAKE_BOOTSTRAP = {"bootstrap_host": "2.2.2.2", "bootstrap_port": 8998}


# The keyed server (test/server/conftest.py): SGLang's two keys, and a model name the Tinker cookbook knows
# (its recipes pick a renderer by the model's name; renderer role_colon).
USER_KEY, ADMIN_KEY = "sk-user", "sk-admin"
KEYED_MODEL_NAME = "meta-llama/Llama-3.2-1B"
