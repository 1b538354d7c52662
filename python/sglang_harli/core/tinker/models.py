"""The Tinker API's training clients, the scheduler's half: one ``TinkerTrainer`` per model, over the
served weights (zero copy, as a job's trainer), each a work source whose units are its requests.

The HTTP side (``srt.tinker``) orders each model's operations (``core.tinker.futures``) and sends them
here one at a time as control requests; an operation that trains (forward_backward, optim_step) is
queued on its model's trainer and answers later, when its last unit has run, through ``Host.answer`` (an
unsolicited message to the tokenizer manager, which resolves the future the client polls). A client is an
interactive source (``core.runner.source``): the scheduling object runs its units before a job's, since a
Tinker loop waits on every answer and a job does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from sglang_harli.core.colocation.work import FinetuneWork, look_ahead
from sglang_harli.core.errors import Conflict, NotFound, SpecError, TooManyJobs
from sglang_harli.core.jobs.spec import LoraSpec
from sglang_harli.core.runner.host import Host
from sglang_harli.core.runner.order import SourceOrder
from sglang_harli.core.runner.source import UnitMeter, WorkSource
from sglang_harli.core.tinker.codec import decode_forward_backward, encode_forward_backward_output
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.tinker.store import TinkerStore
from sglang_harli.core.tinker.trainer import ForwardBackwardResult, TinkerTrainer
from sglang_harli.core.training.lora import training_mode
from sglang_harli.core.wire.control import (
    Ack,
    TinkerCreateModel,
    TinkerDropModel,
    TinkerForwardBackward,
    TinkerLoad,
    TinkerOptimStep,
    TinkerSave,
)

logger = logging.getLogger(__name__)

MAX_MODELS = 4
"""Training clients kept at once (each holds its adapter, gradients and AdamW state); more are refused."""


class TinkerSource(WorkSource):
    """One training client's queued requests, as units; a unit that raises fails that request alone."""

    interactive = True

    def __init__(self, model_id: str, trainer: TinkerTrainer):
        self.name, self.trainer = model_id, trainer

    @property
    def pending(self) -> bool:
        return bool(self.trainer.pending)

    def ready(self) -> bool:
        return True

    def upcoming(self) -> list[FinetuneWork]:
        return self.trainer.peek(look_ahead(self.trainer.units_per_micro_batch))

    def run_one(self, meter: UnitMeter) -> bool:
        trainer = self.trainer
        with meter.unit(trainer.peek(1)[0]) as unit:
            tokens_before = trainer.tokens_trained
            trainer.run_unit()
            unit.tokens = trainer.tokens_trained - tokens_before
        return True

    def fail(self, exc: Exception) -> None:
        logger.warning("tinker request of %s failed: %s", self.name, exc, exc_info=True)
        self.trainer.drop_head(exc)


class TinkerModels:
    def __init__(self, host: Host, order: SourceOrder, *, max_models: int, layers_per_unit: int):
        self.host, self.order = host, order
        self.max_models, self.layers_per_unit = max_models, layers_per_unit
        self.sources: dict[str, TinkerSource] = {}

    # -- control requests ----------------------------------------------------------------------------
    def create(self, request: TinkerCreateModel) -> Ack:
        self._new_trainer(request.model_id, request.lora, request.seed)
        return Ack()

    def _new_trainer(self, model_id: str, lora: LoraSpec, seed: int) -> TinkerTrainer:
        if model_id in self.sources:
            raise Conflict("model_id", f"{model_id!r} exists")
        if len(self.sources) >= self.max_models:
            raise TooManyJobs(
                "model_id", f"{len(self.sources)} training clients exist, the most this server keeps"
            )
        with training_mode():
            model, _ = self.host.bind_model()
            trainer = TinkerTrainer(model, lora, seed, layers_per_unit=self.layers_per_unit)
        source = self.sources[model_id] = TinkerSource(model_id, trainer)
        self.order.add(source)
        logger.info("tinker training client %s created (rank %d)", model_id, lora.r)
        return trainer

    def save(self, request: TinkerSave) -> Ack:
        """Write the model's state or adapter; the HTTP side sends this only once the model's earlier
        requests have finished (``ModelSequence``), so the trainer is idle and the state exact."""
        trainer = self._idle_trainer(request.model_id)
        if request.kind == "weights":
            TinkerStore.write_state(request.directory, trainer.state(), trainer.lora)
        else:
            trainer.save_adapter(request.directory)
        logger.info("tinker %s of %s saved to %s", request.kind, request.model_id, request.directory)
        return Ack()

    def load(self, request: TinkerLoad) -> Ack:
        state, lora = TinkerStore.read_state(request.directory, "path")
        if request.create:
            trainer = self._new_trainer(request.model_id, lora, seed=0)
        else:
            trainer = self._idle_trainer(request.model_id)
            if trainer.lora != lora:
                raise SpecError(
                    "path", f"saved with LoRA {lora}, but {request.model_id!r} has {trainer.lora}"
                )
        try:
            trainer.restore(state, optimizer=request.optimizer)
        except ValueError as exc:
            if request.create:
                self.order.remove(self.sources.pop(request.model_id))
            raise SpecError("path", str(exc)) from None
        logger.info("tinker %s loaded from %s (step %d)", request.model_id, request.directory, trainer.steps)
        return Ack()

    def drop(self, request: TinkerDropModel) -> Ack:
        source = self.sources.pop(request.model_id, None)
        trainer = source.trainer if source is not None else None
        if source is not None:
            self.order.remove(source)
        while trainer is not None and trainer.pending:
            trainer.drop_head(RuntimeError(f"{request.model_id}'s session ended"))
        if trainer is not None:
            logger.info("tinker training client %s dropped (its session ended)", request.model_id)
        return Ack()

    def _idle_trainer(self, model_id: str) -> TinkerTrainer:
        trainer = self._trainer(model_id)
        if not trainer.idle:
            raise Conflict("model_id", f"{model_id!r} has requests running; save and load go between them")
        return trainer

    def forward_backward(self, request: TinkerForwardBackward) -> Ack:
        trainer = self._trainer(request.model_id)
        decoded = decode_forward_backward(request.body)

        def done(result: ForwardBackwardResult) -> None:
            body = encode_forward_backward_output(result.logprobs, result.metrics)
            self._answer(request.request_id, Outcome(body=body, media_type="application/x-protobuf"))

        trainer.forward_backward(decoded, done, fail=self._failer(request.request_id))
        return Ack()

    def optim_step(self, request: TinkerOptimStep) -> Ack:
        trainer = self._trainer(request.model_id)

        def done(metrics: dict[str, float]) -> None:
            self._answer(request.request_id, Outcome(body=msgspec.json.encode({"metrics": metrics})))

        trainer.optim_step(request.adam, done, fail=self._failer(request.request_id))
        return Ack()

    def _failer(self, request_id: str) -> Callable[[Exception], None]:
        def fail(exc: Exception) -> None:
            category = "user" if isinstance(exc, (SpecError, FloatingPointError)) else "server"
            self._answer(request_id, Outcome(error=f"{type(exc).__name__}: {exc}", category=category))

        return fail

    def _trainer(self, model_id: str) -> TinkerTrainer:
        source = self.sources.get(model_id)
        if source is None:
            raise NotFound("model_id", f"no training client {model_id!r} on this server")
        return source.trainer

    def _answer(self, request_id: str, outcome: Outcome) -> None:
        self.host.answer(request_id, outcome)
