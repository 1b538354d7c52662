"""``SchedulerHost``: SGLang's scheduler as the finetune rooms see it (``core.runner.host.Host``).

The served model to bind a training model to (zero copy, ``srt.weights``), the tokenizer and end tokens
evaluation decodes with, the LoRA pool's limits a job's adapter must fit, and the two unsolicited
messages to the tokenizer manager: serve an adapter version (``HarliPublishReq``) and a Tinker
operation's outcome (``HarliTinkerResult``), both over SGLang's own channel to it.
"""

from __future__ import annotations

from sglang_harli.core.jobs.spec import ServingLimits
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.wire.control import AdapterVersion
from sglang_harli.srt.control import HarliPublishReq, HarliTinkerResult
from sglang_harli.srt.weights import bind_training_model

# SGLang's fused LoRA module names -> the PEFT names they serve.
_SERVED_AS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "o_proj": ("o_proj",),
    "down_proj": ("down_proj",),
}


class SchedulerHost:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.model_path: str = scheduler.server_args.model_path

    @property
    def tokenizer(self):
        return self.scheduler.tokenizer

    @property
    def eos_ids(self) -> set[int]:
        """The ids SGLang itself stops generation on: the model's and its generation config's, and the
        tokenizer's end token."""
        configured = set(self.scheduler.model_config.hf_eos_token_id or ())
        return configured | {self.scheduler.tokenizer.eos_token_id} - {None}

    def bind_model(self, tensor_parallel=None):
        return bind_training_model(
            self.scheduler.tp_worker.model_runner.model, self.model_path, tensor_parallel
        )

    def serving_limits(self) -> ServingLimits:
        manager = getattr(self.scheduler.tp_worker.model_runner, "lora_manager", None)
        if manager is None:
            return ServingLimits(enable_lora=False)
        served = set(getattr(manager, "target_modules", None) or ())
        modules = None
        if "all" not in served:
            modules = frozenset(m for name in served for m in _SERVED_AS.get(name, ()))
        return ServingLimits(enable_lora=True, max_lora_rank=manager.max_lora_rank, target_modules=modules)

    def _send(self, message) -> None:
        self.scheduler.ipc_channels.send_to_tokenizer.send_output(message)

    def publish(self, version: AdapterVersion) -> None:
        self._send(HarliPublishReq(adapter=version))

    def answer(self, request_id: str, outcome: Outcome) -> None:
        self._send(HarliTinkerResult(request_id=request_id, outcome=outcome))
