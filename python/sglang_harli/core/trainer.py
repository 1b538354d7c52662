"""``LoraTrainer``: supervised LoRA finetuning over a frozen base model it does not own.

The trainer is written for a host that lends it time in slices: a decode server calls ``run_unit()``
between decode steps or when idle, and may stop calling at any point. So a training run is a plan fixed at
construction (seeded per-epoch shuffles, micro-batches, optimizer steps) executed one *unit* at a time:
the forward and backward of one micro-batch, or one optimizer step. All state lives on the object, so a
paused trainer resumes exactly where it stopped, and the result equals an uninterrupted run.

Math, kept identical to a plain transformers + PEFT loop: next-token cross-entropy on target tokens only,
summed over the micro-batches of an optimizer step and divided by that step's target-token count; AdamW;
warmup then linear/cosine/constant decay (``transformers.get_scheduler``); global-norm clipping.
Micro-batches are packed padding-free into one row with per-example ``position_ids``, which transformers
turns into a block-diagonal causal mask, so no compute is spent on padding.

Every tensor autograd saves in a forward can be routed through ``saved_tensor_hooks`` (pack, unpack):
that is where memory lending places activations in borrowed KV-cache pages.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import get_scheduler

from sglang_harli.core.data import Example
from sglang_harli.core.jobs import LoraSpec, TrainingSpec

SavedTensorHooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class MicroBatch(msgspec.Struct, frozen=True):
    input_ids: torch.Tensor
    """(1, T): the examples of this micro-batch, concatenated."""
    position_ids: torch.Tensor
    """(1, T): restarts at 0 at each example, which marks the packing boundaries."""
    predict_at: torch.Tensor
    """(N,): positions whose logits predict a target token."""
    targets: torch.Tensor
    """(N,): the target token predicted at each of ``predict_at``."""

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack(examples: Sequence[Example], device: torch.device | str = "cpu") -> MicroBatch:
    ids: list[int] = []
    positions: list[int] = []
    predict_at: list[int] = []
    targets: list[int] = []
    for example in examples:
        offset = len(ids)
        ids.extend(example.input_ids)
        positions.extend(range(len(example.input_ids)))
        for i, is_target in enumerate(example.loss_mask):
            if is_target and i > 0:
                predict_at.append(offset + i - 1)
                targets.append(example.input_ids[i])

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return MicroBatch(as_tensor([ids]), as_tensor([positions]), as_tensor(predict_at), as_tensor(targets))


def lora_config(spec: LoraSpec) -> LoraConfig:
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return LoraConfig(
        r=spec.r,
        lora_alpha=alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def plan_steps(num_examples: int, training: TrainingSpec) -> int:
    """Optimizer steps a run takes: per epoch, micro-batches grouped by accumulation, capped by max_steps."""
    micro_batches = math.ceil(num_examples / training.micro_batch_size)
    total = training.epochs * math.ceil(micro_batches / training.gradient_accumulation_steps)
    return min(total, training.max_steps) if training.max_steps else total


def training_mode():
    """Autograd on, even inside an inference-mode serving loop."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


class LoraTrainer:
    """Trains one LoRA adapter on ``base_model`` (frozen, not owned) in resumable units."""

    def __init__(
        self,
        base_model: nn.Module,
        examples: Sequence[Example],
        lora: LoraSpec,
        training: TrainingSpec,
        *,
        saved_tensor_hooks: SavedTensorHooks | None = None,
    ):
        if not examples:
            raise ValueError("no examples to train on")
        self.examples = list(examples)
        self._targets = [sum(e.loss_mask[1:]) for e in self.examples]  # position 0 is never a target
        self.training = training
        self.saved_tensor_hooks = saved_tensor_hooks
        self.device = next(base_model.parameters()).device
        with training_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(training.seed)  # LoRA A init, as `torch.manual_seed(seed); get_peft_model` does
            self.model: PeftModel = get_peft_model(base_model, lora_config(lora))
            self.model.train()
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(
                self.params, lr=training.learning_rate, weight_decay=training.weight_decay
            )
        self.total_steps = plan_steps(len(self.examples), training)
        self.scheduler = get_scheduler(
            _SCHEDULERS[training.lr_scheduler],
            self.optimizer,
            num_warmup_steps=training.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.step = 0
        self.epoch = 0
        self.tokens_trained = 0
        self.loss: float | None = None
        self._epoch_steps: list[list[list[int]]] = []  # this epoch's steps -> micro-batches -> example ids
        self._micro = 0  # next micro-batch of the current step
        self._step_loss = 0.0
        self._step_targets = 0
        self._micro_index = 0  # micro-batches run so far, seeds dropout
        self._start_epoch(0)

    # -- plan ----------------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = torch.randperm(
            len(self.examples), generator=torch.Generator().manual_seed(self.training.seed * 100_003 + epoch)
        ).tolist()
        size, accumulation = self.training.micro_batch_size, self.training.gradient_accumulation_steps
        micro_batches = [order[i : i + size] for i in range(0, len(order), size)]
        self._epoch_steps = [
            micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)
        ]

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def _current_step(self) -> list[list[int]]:
        steps_done_before = self.epoch * len(self._epoch_steps)
        return self._epoch_steps[self.step - steps_done_before]

    # -- units ---------------------------------------------------------------------------------------
    def run_unit(self) -> bool:
        """Run one unit (a micro-batch's forward+backward, or an optimizer step); False when done."""
        if self.done:
            return False
        step_micro_batches = self._current_step()
        with training_mode():
            if self._micro < len(step_micro_batches):
                if self._micro == 0:
                    self._step_targets = sum(self._targets[i] for ids in step_micro_batches for i in ids)
                self._forward_backward([self.examples[i] for i in step_micro_batches[self._micro]])
                self._micro += 1
            else:
                self._optimizer_step()
        return not self.done

    def run(self) -> None:
        while self.run_unit():
            pass

    def _forward_backward(self, examples: list[Example]) -> None:
        batch = pack(examples, self.device)
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(*self.saved_tensor_hooks)
            if self.saved_tensor_hooks
            else contextlib.nullcontext()
        )
        with torch.random.fork_rng(devices=self._rng_devices()), hooks:
            torch.manual_seed(self.training.seed * 1_000_003 + self._micro_index)  # dropout, reproducibly
            logits = self.model(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=batch.predict_at,
            ).logits[0]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss_sum = F.cross_entropy(logits, batch.targets, reduction="sum")
        (loss_sum / max(self._step_targets, 1)).backward()
        self._micro_index += 1
        self._step_loss += float(loss_sum.detach())
        self.tokens_trained += batch.tokens

    def _optimizer_step(self) -> None:
        if self.training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = self._step_loss / max(self._step_targets, 1)
        self._step_loss, self._micro = 0.0, 0
        self.step += 1
        if not self.done and self.step == (self.epoch + 1) * len(self._epoch_steps):
            self._start_epoch(self.epoch + 1)

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    # -- results -------------------------------------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """Write the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        self.model.save_pretrained(directory, safe_serialization=True)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
