"""``TinkerTrainer``: a LoRA adapter trained by the requests of the Tinker API, in the same units as a job.

A Tinker training client does not hand over a dataset and a schedule: it sends ``forward_backward`` (a
batch of datums and a loss; gradients add up) and ``optim_step`` (AdamW with the parameters it gives),
in its own order, and reads back each datum's target-token logprobs. This trainer keeps those requests
in a queue and runs them as the same units a finetune job runs (``core.training.lora.LoraModel``): a
micro-batch of datums packed padding-free, its forward a few decoder layers at a time, the loss, its backward
a few layers at a time, and the optimizer step as one unit, so the QoS policy admits a Tinker loop's work
exactly as it admits a job's and it never breaks the decode SLO.

The math is the Tinker API's, not ``LoraTrainer``'s: position ``i`` of a datum predicts
``target_tokens[i]`` (any token, not the next input), the loss is a *sum* (no normalisation), and the
gradients of successive ``forward_backward`` calls accumulate until ``optim_step`` applies and clears them.

- ``cross_entropy``: ``loss = sum(-logprob(target) * weights)``.
- ``importance_sampling``: ``loss = -sum(exp(logprob(target) - sampler_logprob) * advantages)``.

``forward_only`` runs the forward units and the loss and returns the logprobs without touching the
gradients. A micro-batch is as many whole datums as fit in ``micro_batch_tokens`` (at least one).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sglang_harli.core.colocation.work import FinetuneWork
from sglang_harli.core.jobs.spec import LoraSpec
from sglang_harli.core.tinker.codec import Datum, ForwardBackward
from sglang_harli.core.tinker.params import AdamParams
from sglang_harli.core.training.checkpoint import Progress, TrainerState
from sglang_harli.core.training.lora import LoraModel, SavedTensorHooks, training_mode
from sglang_harli.core.training.tensor_parallel import TensorParallel

MICRO_BATCH_TOKENS = 2048
"""Tokens packed into one micro-batch by default (whole datums; a longer datum goes alone)."""


@dataclass(frozen=True)
class ForwardBackwardResult:
    logprobs: list[np.ndarray]
    """Per datum, float32 (its tokens' length): the logprob of each target token."""
    metrics: dict[str, float]
    """``loss:sum`` and ``tokens:sum``: the SDK merges chunks by the reduction after the ``:``."""


@dataclass
class _Request:
    """One queued request: a forward_backward's micro-batches, or an optim_step."""

    done: Callable[[object], None]
    fail: Callable[[Exception], None] | None = None
    forward_backward: ForwardBackward | None = None
    adam: AdamParams | None = None
    micro_batches: list[list[int]] = field(default_factory=list)
    logprobs: list[np.ndarray | None] = field(default_factory=list)
    loss_sum: float = 0.0


class _Flight:
    """The micro-batch in flight: its packed inputs, layer arguments, activations and gradients."""

    def __init__(self, datums: list[Datum], device):
        ids, positions, self.lengths = [], [], []
        for datum in datums:
            ids.extend(datum.tokens.tolist())
            positions.extend(range(len(datum.tokens)))
            self.lengths.append(len(datum.tokens))
        self.input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        self.position_ids = torch.tensor([positions], dtype=torch.long, device=device)

        def cat(name: str, dtype) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([d.inputs[name] for d in datums])).to(device, dtype)

        self.targets = cat("target_tokens", torch.long)
        self.inputs = {
            name: cat(name, torch.float32)
            for name in ("weights", "logprobs", "advantages")
            if all(name in d.inputs for d in datums)
        }
        self.forward_only = False
        self.layer_calls: list[tuple[tuple, dict]] = []
        self.hidden: torch.Tensor | None = None
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


class TinkerTrainer(LoraModel):
    def __init__(
        self,
        base_model: nn.Module,
        lora: LoraSpec,
        seed: int,
        *,
        layers_per_unit: int | None = None,
        micro_batch_tokens: int = MICRO_BATCH_TOKENS,
        saved_tensor_hooks: SavedTensorHooks | None = None,
        tensor_parallel: TensorParallel | None = None,
    ):
        super().__init__(
            base_model,
            lora,
            seed,
            layers_per_unit=layers_per_unit,
            saved_tensor_hooks=saved_tensor_hooks,
            tensor_parallel=tensor_parallel,
        )
        self.micro_batch_tokens = micro_batch_tokens
        defaults = AdamParams()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=defaults.learning_rate, betas=(defaults.beta1, defaults.beta2), eps=defaults.eps
        )
        self.steps = 0
        self.tokens_trained = 0
        self._queue: deque[_Request] = deque()
        self._micro = 0  # next micro-batch of the request at the head of the queue
        self._unit = 0  # next unit of that micro-batch
        self._flight: _Flight | None = None

    # -- requests ------------------------------------------------------------------------------------
    def forward_backward(
        self,
        request: ForwardBackward,
        done: Callable[[ForwardBackwardResult], None],
        fail: Callable[[Exception], None] | None = None,
    ) -> None:
        """Queue ``request``; ``done`` gets its result once its last unit has run (``fail`` the exception
        if a unit of it raised, ``drop_head``)."""
        micro_batches, current, tokens = [], [], 0
        for index, datum in enumerate(request.data):
            if current and tokens + len(datum.tokens) > self.micro_batch_tokens:
                micro_batches.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += len(datum.tokens)
        micro_batches.append(current)
        self._queue.append(
            _Request(
                done=done,
                fail=fail,
                forward_backward=request,
                micro_batches=micro_batches,
                logprobs=[None] * len(request.data),
            )
        )

    def optim_step(
        self,
        adam: AdamParams,
        done: Callable[[dict[str, float]], None],
        fail: Callable[[Exception], None] | None = None,
    ) -> None:
        """Queue an optimizer step over the gradients accumulated so far; ``done`` gets its metrics."""
        self._queue.append(_Request(done=done, fail=fail, adam=adam))

    # -- saved state -------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No request is queued or half run: the state is exact (gradients not yet applied are not part
        of it, as a Tinker ``save_weights`` does not keep them)."""
        return not self._queue and self._flight is None

    def state(self) -> TrainerState:
        """A copy of the adapter and its AdamW state (``core.tinker.store`` writes it); only when idle."""
        if not self.idle:
            raise RuntimeError("the state is saved between requests")
        return TrainerState(
            weights={name: t.clone() for name, t in self.lora_state().items()},
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            schedule={},
            progress=Progress(step=self.steps, micro_batches=0, tokens_trained=self.tokens_trained),
        )

    def restore(self, state: TrainerState, *, optimizer: bool) -> None:
        """Continue from ``state``: its weights, and with ``optimizer`` its AdamW moments and counts too
        (``load_weights`` with or without the optimizer). Gradients accumulated so far are dropped."""
        if not self.idle:
            raise RuntimeError("the state is loaded between requests")
        if set(state.weights) != {name for name, _ in self._named_params}:
            raise ValueError("the saved LoRA weights do not match this training client's adapter")
        self.load_lora_state(state.weights)
        self.optimizer.zero_grad(set_to_none=True)
        if optimizer:
            self.optimizer.load_state_dict(state.optimizer)
            self.steps, self.tokens_trained = state.progress.step, state.progress.tokens_trained

    def drop_head(self, exc: Exception) -> None:
        """The request at the head of the queue failed with ``exc`` in one of its units: drop it (and the
        micro-batch in flight) and tell its ``fail``; the gradients it may have added stay (as a partial
        forward_backward would leave them on any trainer)."""
        if not self._queue:
            return
        request = self._queue.popleft()
        self._flight, self._micro, self._unit = None, 0, 0
        if request.fail is not None:
            request.fail(exc)

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return len(self._queue)

    # -- units ---------------------------------------------------------------------------------------
    def _units_of(self, request: _Request) -> int:
        """Units per micro-batch of a forward_backward (forward segments, loss, backward segments)."""
        backward = 0 if request.forward_backward.forward_only else len(self._segments)
        return len(self._segments) + 1 + backward

    def peek(self, count: int) -> list[FinetuneWork]:
        """The next ``count`` units of the queued requests (fewer if fewer are queued)."""
        upcoming: list[FinetuneWork] = []
        micro, unit = self._micro, self._unit
        for request in self._queue:
            if len(upcoming) >= count:
                break
            if request.adam is not None:
                upcoming.append(FinetuneWork(kind="optimizer", params=self._trainable))
                micro, unit = 0, 0
                continue
            data = request.forward_backward.data
            per_micro = self._units_of(request)
            while micro < len(request.micro_batches) and len(upcoming) < count:
                tokens = sum(len(data[i].tokens) for i in request.micro_batches[micro])
                upcoming.append(self._unit_work(unit, per_micro, tokens))
                unit += 1
                if unit == per_micro:
                    micro, unit = micro + 1, 0
            micro, unit = 0, 0
        return upcoming

    def run_unit(self) -> bool:
        """Run the next unit; False when nothing is queued."""
        if not self._queue:
            return False
        request = self._queue[0]
        with training_mode():
            if request.adam is not None:
                metrics = self._optimizer_step(request.adam)
                self._queue.popleft()
                request.done(metrics)
                return True
            segments = len(self._segments)
            if self._unit == 0:
                self._start(request)
            if self._unit < segments:
                self._forward_segment(self._unit)
            elif self._unit == segments:
                self._loss(request)
            else:
                self._backward_segment(self._units_of(request) - 1 - self._unit)
            self._unit += 1
            if self._unit == self._units_of(request):
                self._finish_micro_batch(request)
        return True

    def _start(self, request: _Request) -> None:
        data = request.forward_backward.data
        flight = _Flight([data[i] for i in request.micro_batches[self._micro]], self.device)
        flight.forward_only = request.forward_backward.forward_only
        flight.layer_calls, flight.hidden = self.record_layer_calls(
            input_ids=flight.input_ids, position_ids=flight.position_ids, use_cache=False
        )
        self._flight = flight

    def _forward_segment(self, index: int) -> None:
        flight = self._flight
        first = index == 0 or flight.forward_only
        hidden = flight.hidden if first else flight.hidden.detach().requires_grad_(True)
        with self._saving(), torch.set_grad_enabled(not flight.forward_only):
            output = self._layers(index, hidden, flight.layer_calls)
        flight.segments.append((hidden, output))
        flight.hidden = output

    def _loss(self, request: _Request) -> None:
        flight, forward_backward = self._flight, request.forward_backward
        forward_only = forward_backward.forward_only
        hidden = flight.hidden.detach().requires_grad_(not forward_only)
        with self._saving(), torch.set_grad_enabled(not forward_only):
            logits = self._lm_head(self._decoder.norm(hidden))[0].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, flight.targets[:, None])[:, 0]
            if forward_backward.loss_fn == "importance_sampling":
                ratio = torch.exp(logprobs - flight.inputs["logprobs"])
                loss_sum = -(ratio * flight.inputs["advantages"]).sum()
            else:
                loss_sum = -(logprobs * flight.inputs["weights"]).sum()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"loss is {float(loss_sum.detach())}; check the datums and the learning rate"
            )
        if not forward_only:
            loss_sum.backward()
            flight.hidden = hidden.grad
        request.loss_sum += float(loss_sum.detach())
        values = logprobs.detach().cpu().numpy().astype(np.float32)
        offsets = np.cumsum([0, *flight.lengths])
        for slot, index in enumerate(request.micro_batches[self._micro]):
            request.logprobs[index] = values[offsets[slot] : offsets[slot + 1]]

    def _backward_segment(self, index: int) -> None:
        self._backward_through(self._flight, index)

    def _finish_micro_batch(self, request: _Request) -> None:
        flight, self._flight = self._flight, None
        self._micro += 1
        self._unit = 0
        if not request.forward_backward.forward_only:
            self.tokens_trained += flight.tokens
        if self._micro == len(request.micro_batches):
            self._queue.popleft()
            self._micro = 0
            tokens = float(sum(len(d.tokens) for d in request.forward_backward.data))
            request.done(
                ForwardBackwardResult(
                    logprobs=request.logprobs, metrics={"loss:sum": request.loss_sum, "tokens:sum": tokens}
                )
            )

    def _optimizer_step(self, adam: AdamParams) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        metrics: dict[str, float] = {}
        if adam.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, adam.grad_clip_norm)
            metrics["grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return metrics
