"""``LoraTrainer``: supervised LoRA finetuning over a frozen base model it does not own.

The trainer is written for a host that lends it time in slices: a decode server calls ``run_unit()``
between decode steps or when idle, and may stop calling at any point. So a training run is a plan fixed at
construction (seeded per-epoch shuffles, micro-batches, optimizer steps) executed one *unit* at a time,
and units are small enough to fit in the slack of one decode step: the forward of a few decoder layers of
one micro-batch, the loss (final norm, LM head, cross-entropy and their backward), the backward of a few
layers, or one optimizer step. ``peek()`` describes the coming units (``core.work.FinetuneWork``) so a
QoS policy can admit exactly as many as fit. All state, including the autograd graph of a micro-batch in
flight, lives on the object, so a paused trainer resumes exactly where it stopped and the result equals
an uninterrupted run.

Layer-wise units work by cutting the autograd graph at layer boundaries: each forward segment starts from
a detached copy of the previous segment's output, and each backward segment hands the gradient of its
input to the segment before it. The layers are called exactly as the model's own forward calls them (the
arguments are recorded from one pass of the model with its layers short-circuited), so masks, rotary
embeddings and per-layer attention types stay the model's business.

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
import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import get_scheduler

from sglang_harli.core.checkpoint import Progress, TrainerState
from sglang_harli.core.data import Example
from sglang_harli.core.jobs import LoraSpec, TrainingSpec
from sglang_harli.core.tensor_parallel import TensorParallel
from sglang_harli.core.work import FinetuneWork

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


class _InFlight:
    """The micro-batch between its first forward unit and its last backward unit."""

    def __init__(self, batch: MicroBatch, layer_calls: list[tuple[tuple, dict]], hidden: torch.Tensor):
        self.batch = batch
        self.layer_calls = layer_calls
        self.hidden = hidden  # input of the next forward segment; then the gradient flowing backwards
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) per forward segment
        self.loss_sum = 0.0


class LoraModel:
    """A LoRA adapter over ``base_model`` (frozen, not owned), run in segments of decoder layers.

    What every trainer of this package shares: the PEFT model drawn with a seed, the layers cut into
    segments (one unit of work each), the arguments the model's own forward passes each layer, the final
    norm and head, and the adapter's weights and files. What a trainer trains on, and when it steps, is
    the subclass's: ``LoraTrainer`` runs a planned supervised run, ``core.tinker_trainer`` the requests of
    the Tinker API."""

    def __init__(
        self,
        base_model: nn.Module,
        lora: LoraSpec,
        seed: int,
        *,
        layers_per_unit: int | None = None,
        saved_tensor_hooks: SavedTensorHooks | None = None,
        tensor_parallel: TensorParallel | None = None,
    ):
        if layers_per_unit is not None and layers_per_unit < 1:
            raise ValueError("layers_per_unit must be at least 1")
        self.lora = lora
        self.saved_tensor_hooks = saved_tensor_hooks
        self.device = next(base_model.parameters()).device
        # With tensor parallelism, ``base_model`` is this rank's slice (``core.tensor_parallel``).
        self.tensor_parallel = tp = tensor_parallel
        with training_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)  # LoRA A init, as `torch.manual_seed(seed); get_peft_model` does
            self.model: PeftModel = get_peft_model(base_model, lora_config(lora))
            if tp is not None:  # the slices of what one rank would have drawn
                dtype = next(base_model.parameters()).dtype
                tp.load_slices(self.model, tp.initial_adapter(lora_config(lora), seed, dtype))
                tp.install(self.model)
            self.model.train()
            self._named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.params = [p for _, p in self._named_params]
        causal_lm = self.model.get_base_model()
        self._decoder = causal_lm.get_decoder()
        self._lm_head = causal_lm.get_output_embeddings()
        layers = len(self._decoder.layers)
        per_unit = min(layers_per_unit or layers, layers)
        self._segments = [range(i, min(i + per_unit, layers)) for i in range(0, layers, per_unit)]
        self._trainable = sum(p.numel() for p in self.params)

    def _saving(self):
        if self.saved_tensor_hooks is None:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(*self.saved_tensor_hooks)

    def record_layer_calls(self, **decoder_kwargs) -> tuple[list[tuple[tuple, dict]], torch.Tensor]:
        """One pass of the decoder with its layers short-circuited: the arguments the model's own forward
        passes each layer (masks, rotary embeddings, a KV cache), and the first layer's input."""
        calls: list[tuple[tuple, dict]] = []
        inputs: list[torch.Tensor] = []

        def record(hidden_states, *args, **kwargs):
            inputs.append(hidden_states)
            calls.append((args, kwargs))
            return hidden_states

        layers = list(self._decoder.layers)
        for layer in layers:  # an instance attribute shadows the class's forward for this one pass
            layer.forward = record
        try:
            with torch.no_grad():
                self._decoder(**decoder_kwargs)
        finally:
            for layer in layers:
                del layer.forward
        if len(calls) != len(layers):
            raise RuntimeError(f"the decoder called {len(calls)} of its {len(layers)} layers")
        return calls, inputs[0]

    def run_layers(self, segment: int, hidden: torch.Tensor, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        """Decoder layers of ``segment`` on ``hidden`` without autograd (evaluation)."""
        with torch.no_grad():
            return self._layers(segment, hidden, calls)

    def _layers(self, segment: int, hidden: torch.Tensor, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        """Decoder layers of ``segment``, each called with the arguments the model's forward gave it."""
        for layer_index in self._segments[segment]:
            args, kwargs = calls[layer_index]
            hidden = self._decoder.layers[layer_index](hidden, *args, **kwargs)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (logits in float32), without autograd (evaluation)."""
        with torch.no_grad():
            logits = self._lm_head(self._decoder.norm(hidden))
        return logits.float()

    @property
    def segments(self) -> int:
        """Forward (or backward) units per micro-batch."""
        return len(self._segments)

    def segment_layers(self, segment: int) -> int:
        return len(self._segments[segment])

    def _unit_work(self, unit: int, per_micro: int, tokens: int) -> FinetuneWork:
        """Unit ``unit`` of a micro-batch of ``tokens`` that takes ``per_micro`` units: the forward
        segments, then the loss, then the backward segments in reverse."""
        segments = len(self._segments)
        if unit < segments:
            return FinetuneWork(kind="forward", tokens=tokens, layers=len(self._segments[unit]))
        if unit == segments:
            return FinetuneWork(kind="loss", tokens=tokens)
        return FinetuneWork(kind="backward", tokens=tokens, layers=len(self._segments[per_micro - 1 - unit]))

    @staticmethod
    def _backward_through(flight, index: int) -> None:
        """Backward segment ``index`` of the micro-batch in flight: the gradient of its output (in
        ``flight.hidden``) through its layers, leaving the gradient of its input for the segment before."""
        hidden, output = flight.segments.pop()
        assert len(flight.segments) == index
        torch.autograd.backward(output, flight.hidden)
        flight.hidden = hidden.grad if index > 0 else None

    def load_lora_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the LoRA weights (e.g. the best eval's snapshot, before publishing it)."""
        named = dict(self._named_params)
        with torch.no_grad():
            for name, tensor in weights.items():
                named[name].copy_(tensor)

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    # -- results -------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | None) -> None:
        """Write the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

        With tensor parallelism every rank must call this (the adapter is gathered); one of them passes
        the ``directory``, the others ``None``."""
        if self.tensor_parallel is None:
            self.model.save_pretrained(directory, safe_serialization=True)
            return
        full = self.tensor_parallel.gathered(self.model)
        if directory is not None:
            self.model.save_pretrained(
                directory, safe_serialization=True, state_dict=full, save_embedding_layers=False
            )

    def lora_state(self) -> dict[str, torch.Tensor]:
        """This rank's LoRA weights (with tensor parallelism, its slices)."""
        return {n: p.detach() for n, p in self._named_params}


class LoraTrainer(LoraModel):
    """Trains one LoRA adapter on ``base_model`` (frozen, not owned) in resumable units."""

    def __init__(
        self,
        base_model: nn.Module,
        examples: Sequence[Example],
        lora: LoraSpec,
        training: TrainingSpec,
        *,
        layers_per_unit: int | None = None,
        saved_tensor_hooks: SavedTensorHooks | None = None,
        on_micro_batch_end: Callable[[int], None] | None = None,
        place_grads: Callable[[list[nn.Parameter]], None] | None = None,
        tensor_parallel: TensorParallel | None = None,
    ):
        if not examples:
            raise ValueError("no examples to train on")
        super().__init__(
            base_model,
            lora,
            training.seed,
            layers_per_unit=layers_per_unit,
            saved_tensor_hooks=saved_tensor_hooks,
            tensor_parallel=tensor_parallel,
        )
        self.examples = list(examples)
        self._targets = [sum(e.loss_mask[1:]) for e in self.examples]  # position 0 is never a target
        self._lengths = [len(e.input_ids) for e in self.examples]
        self.training = training
        # Told when a micro-batch's saved tensors are gone: with its tokens when it finished, 0 if dropped.
        self.on_micro_batch_end = on_micro_batch_end
        # Asked to give the LoRA parameters their gradient buffers when a step's first backward starts.
        self.place_grads = place_grads
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
        self.tokens_trained = 0
        self.loss: float | None = None
        self._epoch_plans: dict[int, list[list[list[int]]]] = {}  # epoch -> steps -> micro-batches -> ids
        self._micro = 0  # next micro-batch of the current step
        self._unit = 0  # next unit of that micro-batch: forward segments, loss, backward segments
        self._in_flight: _InFlight | None = None
        self._backward_started = False  # the micro-batch in flight has added to the gradients
        self._step_start = (0, 0)  # (micro-batches started, tokens trained) when this step began
        self._step_loss = 0.0
        self._step_targets = 0
        self._micro_index = 0  # micro-batches started so far, seeds dropout

    # -- plan ----------------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        plan = self._epoch_plans.get(epoch)
        if plan is None:
            order = torch.randperm(
                len(self.examples),
                generator=torch.Generator().manual_seed(self.training.seed * 100_003 + epoch),
            ).tolist()
            size, accumulation = self.training.micro_batch_size, self.training.gradient_accumulation_steps
            micro_batches = [order[i : i + size] for i in range(0, len(order), size)]
            plan = [micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)]
            self._epoch_plans = {e: p for e, p in self._epoch_plans.items() if e >= epoch - 1}
            self._epoch_plans[epoch] = plan
        return plan

    def _step_plan(self, step: int) -> list[list[int]]:
        steps_per_epoch = len(self._epoch_plan(0))
        return self._epoch_plan(step // steps_per_epoch)[step % steps_per_epoch]

    @property
    def epoch(self) -> int:
        return min(self.step, max(self.total_steps - 1, 0)) // len(self._epoch_plan(0))

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def in_flight(self) -> bool:
        """A micro-batch has started and not finished: its activations are held."""
        return self._in_flight is not None

    @property
    def units_per_micro_batch(self) -> int:
        return 2 * len(self._segments) + 1

    def peek(self, count: int) -> list[FinetuneWork]:
        """The next ``count`` units (fewer near the end of the run), without running anything."""
        upcoming: list[FinetuneWork] = []
        step, micro, unit = self.step, self._micro, self._unit
        per_micro = self.units_per_micro_batch
        while len(upcoming) < count and step < self.total_steps:
            plan = self._step_plan(step)
            if micro == len(plan):
                upcoming.append(FinetuneWork(kind="optimizer", params=self._trainable))
                step, micro, unit = step + 1, 0, 0
                continue
            upcoming.append(self._unit_work(unit, per_micro, sum(self._lengths[i] for i in plan[micro])))
            unit += 1
            if unit == per_micro:
                micro, unit = micro + 1, 0
        return upcoming

    # -- units ---------------------------------------------------------------------------------------
    def run_unit(self) -> bool:
        """Run the next unit (see ``peek``); False once the run is done."""
        if self.done:
            return False
        plan = self._step_plan(self.step)
        with training_mode():
            if self._micro == len(plan):
                self._optimizer_step()
                return not self.done
            if self._micro == 0 and self._unit == 0:
                self._step_targets = sum(self._targets[i] for ids in plan for i in ids)
                self._step_start = (self._micro_index, self.tokens_trained)
            segments = len(self._segments)
            if self._unit == 0:
                self._start_micro_batch([self.examples[i] for i in plan[self._micro]])
            if self._unit < segments:
                self._forward_segment(self._unit)
            elif self._unit == segments:
                self._loss()
            else:
                self._backward_segment(self.units_per_micro_batch - 1 - self._unit)
            self._unit += 1
            if self._unit == self.units_per_micro_batch:
                self._finish_micro_batch()
        return not self.done

    def run(self) -> None:
        while self.run_unit():
            pass

    def abort_micro_batch(self) -> int:
        """Drop the micro-batch in flight, as if it had not started; returns the units thrown away.

        The host calls this when it needs the memory holding the micro-batch's activations back at once.
        Before its backward began, nothing else changed. Once its backward has added to the LoRA
        gradients, the whole optimizer step is dropped instead (its earlier micro-batches' gradients
        cannot be told apart) and replayed from its first micro-batch. Dropout is seeded by micro-batch
        and segment, so replaying gives exactly what an uninterrupted run gives.
        """
        if self._in_flight is None:
            return 0
        dropped = self._unit
        if self._backward_started:
            dropped += self._micro * self.units_per_micro_batch
            self._micro_index, self.tokens_trained = self._step_start
            self._micro, self._step_loss = 0, 0.0
            self.optimizer.zero_grad(set_to_none=True)
        self._unit, self._in_flight, self._backward_started = 0, None, False
        if self.on_micro_batch_end is not None:
            self.on_micro_batch_end(0)
        return dropped

    def _start_micro_batch(self, examples: list[Example]) -> None:
        batch = pack(examples, self.device)
        calls, embeddings = self.record_layer_calls(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        )
        self._in_flight = _InFlight(batch, calls, embeddings)

    def _forward_segment(self, index: int) -> None:
        flight = self._in_flight
        hidden = flight.hidden if index == 0 else flight.hidden.detach().requires_grad_(True)
        with torch.random.fork_rng(devices=self._rng_devices()), self._saving():
            torch.manual_seed((self.training.seed * 1_000_003 + self._micro_index) * 1_009 + index)  # dropout
            output = self._layers(index, hidden, flight.layer_calls)
        flight.segments.append((hidden, output))
        flight.hidden = output

    def _loss(self) -> None:
        flight, batch = self._in_flight, self._in_flight.batch
        hidden = flight.hidden.detach().requires_grad_(True)
        with self._saving():
            normed = self._decoder.norm(hidden)
            logits = self._lm_head(normed[:, batch.predict_at, :])[0]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss_sum = F.cross_entropy(logits, batch.targets, reduction="sum")
        if not torch.isfinite(loss_sum):  # stop before a NaN reaches the gradients, the adapter, the users
            raise FloatingPointError(
                f"loss is {float(loss_sum.detach())} at optimizer step {self.step + 1}; "
                "lower training.learning_rate or check the data"
            )
        self._before_backward()  # a LoRA on the LM head gets its gradient here
        (loss_sum / max(self._step_targets, 1)).backward()
        flight.loss_sum = float(loss_sum.detach())
        flight.hidden = hidden.grad

    def _backward_segment(self, index: int) -> None:
        flight = self._in_flight
        self._before_backward()
        self._backward_through(flight, index)

    def _before_backward(self) -> None:
        if self.place_grads is not None and self.params[0].grad is None:  # the step's first backward
            self.place_grads(self.params)
        self._backward_started = True

    def _finish_micro_batch(self) -> None:
        flight, self._in_flight = self._in_flight, None
        self._backward_started = False
        self._micro += 1
        self._unit = 0
        self._micro_index += 1
        self._step_loss += flight.loss_sum
        self.tokens_trained += flight.batch.tokens
        tokens = flight.batch.tokens
        del flight
        if self.on_micro_batch_end is not None:
            self.on_micro_batch_end(tokens)

    def _optimizer_step(self) -> None:
        tp = self.tensor_parallel
        if tp is not None:
            tp.reduce_grads(self._named_params)
        if self.training.max_grad_norm > 0:
            if tp is not None:
                norm = tp.clip_grad_norm_(self._named_params, self.training.max_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.training.max_grad_norm)
            if not torch.isfinite(norm):
                raise FloatingPointError(
                    f"gradient norm is {float(norm)} at optimizer step {self.step + 1}; "
                    "lower training.learning_rate or check the data"
                )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = self._step_loss / max(self._step_targets, 1)
        self._step_loss, self._micro = 0.0, 0
        self.step += 1

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def at_step_boundary(self) -> bool:
        """No optimizer step is half done: the state is small and a checkpoint is exact."""
        return self._micro == 0 and self._in_flight is None

    def state(self) -> TrainerState:
        """A copy of the run's state (see ``core.checkpoint``); only at a step boundary."""
        if not self.at_step_boundary:
            raise RuntimeError("a checkpoint is taken between optimizer steps")
        return TrainerState(
            weights={name: t.clone() for name, t in self.lora_state().items()},
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            schedule=self.scheduler.state_dict(),
            progress=Progress(
                step=self.step,
                micro_batches=self._micro_index,
                tokens_trained=self.tokens_trained,
                loss=self.loss,
            ),
        )

    def restore(self, state: TrainerState) -> None:
        """Continue from ``state`` (from a trainer built with the same arguments) as if never stopped."""
        if not self.at_step_boundary or self.step:
            raise RuntimeError("restore a freshly built trainer")
        if set(state.weights) != {name for name, _ in self._named_params}:
            raise ValueError("the checkpoint's LoRA weights do not match this job's adapter")
        self.load_lora_state(state.weights)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.schedule)
        progress = state.progress
        self.step, self._micro_index = progress.step, progress.micro_batches
        self.tokens_trained, self.loss = progress.tokens_trained, progress.loss
