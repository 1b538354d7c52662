"""``LoraTrainer``: supervised LoRA finetuning over a frozen base model it does not own.

The trainer is written for a host that lends it time in slices: a decode server calls ``run_unit()``
between decode steps or when idle, and may stop calling at any point. So a training run is a plan fixed at
construction (seeded per-epoch shuffles, micro-batches, optimizer steps) executed one *unit* at a time,
and units are small enough to fit in the slack of one decode step: the forward of a few decoder layers of
one micro-batch, the loss (final norm, LM head, cross-entropy and their backward), the backward of a few
layers, or one optimizer step. ``peek()`` describes the coming units (``core.colocation.work.FinetuneWork``)
so a QoS policy can admit exactly as many as fit. All state, including the autograd graph of a micro-batch in
flight, lives on the object, so a paused trainer resumes exactly where it stopped and the result equals
an uninterrupted run.

Units run layer-wise on ``core.training.lora.LoraModel``, which cuts the autograd graph at layer
boundaries and calls the layers exactly as the model's own forward does.

Math, kept identical to a plain transformers + PEFT loop: next-token cross-entropy on target tokens only,
summed over the micro-batches of an optimizer step and divided by that step's target-token count; AdamW;
warmup then linear/cosine/constant decay (``transformers.get_scheduler``); global-norm clipping.
Micro-batches are packed padding-free into one row with per-example ``position_ids``, which transformers
turns into a block-diagonal causal mask, so no compute is spent on padding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import msgspec
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_scheduler

from sglang_harli.core.colocation.work import FinetuneWork
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.training.checkpoint import Progress, TrainerState
from sglang_harli.core.training.lora import LoraModel, SavedTensorHooks, training_mode
from sglang_harli.core.training.tensor_parallel import TensorParallel

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


def rehearsed_per_epoch(num_examples: int, pool: int, ratio: float) -> int:
    """Rehearsal examples in each epoch: ``ratio`` per training example, rounded up, at most the pool."""
    return min(pool, math.ceil(ratio * num_examples)) if pool else 0


def plan_steps(num_examples: int, training: TrainingSpec) -> int:
    """Optimizer steps a run takes: per epoch (``num_examples``, rehearsal included), micro-batches grouped
    by accumulation, capped by max_steps."""
    micro_batches = math.ceil(num_examples / training.micro_batch_size)
    total = training.epochs * math.ceil(micro_batches / training.gradient_accumulation_steps)
    return min(total, training.max_steps) if training.max_steps else total


class StepPlan:
    """The run's order, fixed at construction: each epoch a seeded shuffle of the examples, cut into
    micro-batches, grouped into optimizer steps; and the learning rate over those steps.

    An epoch's shuffle depends on the seed and the epoch alone and is drawn on a generator of its own, so
    any step's micro-batches can be rebuilt at any time (by ``peek`` looking ahead, or after a restore)
    without touching the global random state.

    With ``rehearsal`` (``core.jobs.rehearsal``), each epoch also takes the next ``rehearsed_per_epoch``
    of them in a seeded order (indices past the training examples); without, the plain shuffle."""

    def __init__(
        self,
        examples: Sequence[Example],
        training: TrainingSpec,
        *,
        rehearsal: Sequence[Example] = (),
        rehearsal_ratio: float = 0.0,
    ):
        self.trained = len(examples)
        self.examples = [*examples, *rehearsal]
        self.training = training
        self._rehearsed = rehearsed_per_epoch(self.trained, len(rehearsal), rehearsal_ratio)
        seeded = torch.Generator().manual_seed(training.seed)
        self._rehearsal_order = torch.randperm(len(rehearsal), generator=seeded).tolist()
        self.total_steps = plan_steps(self.trained + self._rehearsed, training)
        self._targets = [sum(e.loss_mask[1:]) for e in self.examples]  # position 0 is never a target
        self._lengths = [len(e.input_ids) for e in self.examples]
        self._epoch_plans: dict[int, list[list[list[int]]]] = {}  # epoch -> steps -> micro-batches -> ids

    def step(self, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step``, as indices into ``examples``."""
        steps_per_epoch = len(self._epoch_plan(0))
        return self._epoch_plan(step // steps_per_epoch)[step % steps_per_epoch]

    def epoch(self, step: int) -> int:
        """The epoch of step ``step``; the last one once the run is done."""
        return min(step, max(self.total_steps - 1, 0)) // len(self._epoch_plan(0))

    def tokens(self, micro_batch: list[int]) -> int:
        return sum(self._lengths[i] for i in micro_batch)

    def targets(self, step: list[list[int]]) -> int:
        """Target tokens in a step's micro-batches, which its loss is divided by."""
        return sum(self._targets[i] for ids in step for i in ids)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning rate over the planned steps: warmup, then the spec's decay to the last step."""
        return get_scheduler(
            _SCHEDULERS[self.training.lr_scheduler],
            optimizer,
            num_warmup_steps=self.training.warmup_steps,
            num_training_steps=self.total_steps,
        )

    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        plan = self._epoch_plans.get(epoch)
        if plan is None:
            members = list(range(self.trained))
            pool = self._rehearsal_order
            members += [
                self.trained + pool[(epoch * self._rehearsed + j) % len(pool)] for j in range(self._rehearsed)
            ]
            order = torch.randperm(
                len(members),
                generator=torch.Generator().manual_seed(self.training.seed * 100_003 + epoch),
            ).tolist()
            order = [members[i] for i in order]
            size, accumulation = self.training.micro_batch_size, self.training.gradient_accumulation_steps
            micro_batches = [order[i : i + size] for i in range(0, len(order), size)]
            plan = [micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)]
            self._epoch_plans = {e: p for e, p in self._epoch_plans.items() if e >= epoch - 1}
            self._epoch_plans[epoch] = plan
        return plan


class _InFlight:
    """The micro-batch between its first forward unit and its last backward unit."""

    def __init__(self, batch: MicroBatch, layer_calls: list[tuple[tuple, dict]], hidden: torch.Tensor):
        self.batch = batch
        self.layer_calls = layer_calls
        self.hidden = hidden  # input of the next forward segment; then the gradient flowing backwards
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) per forward segment
        self.head_input: torch.Tensor | None = None  # the loss chunks' input, collecting their gradients
        self.loss_sum = 0.0


class _Checkpoints:
    """A trainer's run state as a checkpoint (``core.training.checkpoint``), between optimizer steps."""

    @property
    def at_step_boundary(self) -> bool:
        """No optimizer step is half done: the state is small and a checkpoint is exact."""
        return self._micro == 0 and self._in_flight is None

    def state(self) -> TrainerState:
        """A copy of the run's state (see ``core.training.checkpoint``); only at a step boundary."""
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


class LoraTrainer(LoraModel, _Checkpoints):
    """Trains one LoRA adapter on ``base_model`` (frozen, not owned) in resumable units."""

    def __init__(
        self,
        base_model: nn.Module,
        examples: Sequence[Example],
        lora: LoraSpec,
        training: TrainingSpec,
        *,
        layers_per_unit: int | None = None,
        loss_chunks: int | None = None,
        saved_tensor_hooks: SavedTensorHooks | None = None,
        on_micro_batch_end: Callable[[int], None] | None = None,
        place_grads: Callable[[list[nn.Parameter]], None] | None = None,
        tensor_parallel: TensorParallel | None = None,
        rehearsal: Sequence[Example] = (),
        rehearsal_ratio: float = 0.0,
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
        if loss_chunks is not None and loss_chunks < 1:
            raise ValueError("loss_chunks must be at least 1")
        self.loss_chunks = loss_chunks or self.head_chunks()
        self.plan = StepPlan(examples, training, rehearsal=rehearsal, rehearsal_ratio=rehearsal_ratio)
        self.examples = self.plan.examples
        self.training = training
        # Told when a micro-batch's saved tensors are gone: with its tokens when it finished, 0 if dropped.
        self.on_micro_batch_end = on_micro_batch_end
        # Asked to give the LoRA parameters their gradient buffers when a step's first backward starts.
        self.place_grads = place_grads
        self.optimizer = torch.optim.AdamW(
            self.params, lr=training.learning_rate, weight_decay=training.weight_decay
        )
        self.total_steps = self.plan.total_steps
        self.scheduler = self.plan.scheduler(self.optimizer)
        self.step = 0
        self.tokens_trained = 0
        self.loss: float | None = None
        self._micro = 0  # next micro-batch of the current step
        self._unit = 0  # next unit of that micro-batch: forward segments, loss, backward segments
        self._in_flight: _InFlight | None = None
        self._backward_started = False  # the micro-batch in flight has added to the gradients
        self._step_start = (0, 0)  # (micro-batches started, tokens trained) when this step began
        self._step_loss = 0.0
        self._step_targets = 0
        self._micro_index = 0  # micro-batches started so far, seeds dropout

    # -- plan ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.plan.epoch(self.step)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def in_flight(self) -> bool:
        """A micro-batch has started and not finished: its activations are held."""
        return self._in_flight is not None

    def peek(self, count: int) -> list[FinetuneWork]:
        """The next ``count`` units (fewer near the end of the run), without running anything."""
        upcoming: list[FinetuneWork] = []
        step, micro, unit = self.step, self._micro, self._unit
        per_micro = self.units_per_micro_batch
        while len(upcoming) < count and step < self.total_steps:
            plan = self.plan.step(step)
            if micro == len(plan):
                upcoming.append(FinetuneWork(kind="optimizer", params=self._trainable))
                step, micro, unit = step + 1, 0, 0
                continue
            upcoming.append(self._unit_work(unit, per_micro, self.plan.tokens(plan[micro])))
            unit += 1
            if unit == per_micro:
                micro, unit = micro + 1, 0
        return upcoming

    # -- units ---------------------------------------------------------------------------------------
    def run_unit(self) -> bool:
        """Run the next unit (see ``peek``); False once the run is done."""
        if self.done:
            return False
        plan = self.plan.step(self.step)
        with training_mode():
            if self._micro == len(plan):
                self._optimizer_step()
                return not self.done
            if self._micro == 0 and self._unit == 0:
                self._step_targets = self.plan.targets(plan)
                self._step_start = (self._micro_index, self.tokens_trained)
            segments = len(self._segments)
            if self._unit == 0:
                self._start_micro_batch([self.examples[i] for i in plan[self._micro]])
            if self._unit < segments:
                self._forward_segment(self._unit)
            elif self._unit < segments + self.loss_chunks:
                self._loss(self._unit - segments)
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

    def _loss(self, chunk: int) -> None:
        """Loss chunk ``chunk`` of ``loss_chunks``: final norm, LM head and cross-entropy over its share of
        the micro-batch's targets, and their backward, which adds to the gradient of the head's input (the
        norm works row by row, so a chunk of rows costs its share and changes no figure)."""
        flight, batch = self._in_flight, self._in_flight.batch
        if chunk == 0:
            flight.head_input = flight.hidden.detach().requires_grad_(True)
        hidden = flight.head_input
        rows = torch.tensor_split(torch.arange(batch.targets.numel()), self.loss_chunks)[chunk]
        if rows.numel():
            self._loss_rows(hidden, batch.predict_at[rows], batch.targets[rows])
        if chunk == self.loss_chunks - 1:
            flight.hidden = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)

    def _loss_rows(self, hidden: torch.Tensor, predict_at: torch.Tensor, targets: torch.Tensor) -> None:
        flight = self._in_flight
        with self._saving():
            normed = self._decoder.norm(hidden[:, predict_at, :])
            logits = self._lm_head(normed)[0]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        if not torch.isfinite(loss_sum):  # stop before a NaN reaches the gradients, the adapter, the users
            raise FloatingPointError(
                f"loss is {float(loss_sum.detach())} at optimizer step {self.step + 1}; "
                "lower training.learning_rate or check the data"
            )
        self._before_backward()  # a LoRA on the LM head gets its gradient here
        (loss_sum / max(self._step_targets, 1)).backward()
        flight.loss_sum += float(loss_sum.detach())

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
