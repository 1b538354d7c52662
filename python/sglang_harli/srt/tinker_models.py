"""The Tinker API's training clients, the scheduler's half: one ``TinkerTrainer`` per model, over the
served weights (zero copy, as a job's trainer), their requests run as finetune units.

The HTTP side (``srt.tinker``) orders each model's operations (``core.tinker_futures``) and sends them
here one at a time as control requests; an operation that trains (forward_backward, optim_step) is
queued on its model's trainer and answers later, when its last unit has run, with an unsolicited
``HarliTinkerResult`` to the tokenizer manager, which resolves the future the client polls. The unit
runner offers the policy these units before a job's (``srt.unit_runner``): a Tinker loop is interactive,
a job is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from sglang_harli.core.control import (
    Ack,
    TinkerCreateModel,
    TinkerDropModel,
    TinkerForwardBackward,
    TinkerLoad,
    TinkerOptimStep,
    TinkerSave,
)
from sglang_harli.core.errors import Conflict, NotFound, SpecError, TooManyJobs
from sglang_harli.core.jobs import LoraSpec
from sglang_harli.core.tinker_codec import decode_forward_backward, encode_forward_backward_output
from sglang_harli.core.tinker_futures import Outcome
from sglang_harli.core.tinker_store import TinkerStore
from sglang_harli.core.tinker_trainer import ForwardBackwardResult, TinkerTrainer
from sglang_harli.core.trainer import training_mode
from sglang_harli.core.work import FinetuneWork
from sglang_harli.srt.control import HarliTinkerResult
from sglang_harli.srt.weights import bind_training_model

logger = logging.getLogger(__name__)

MAX_MODELS = 4
"""Training clients kept at once (each holds its adapter, gradients and AdamW state); more are refused."""


class TinkerModels:
    def __init__(self, scheduler, *, max_models: int, layers_per_unit: int, send: Callable[[object], None]):
        self.scheduler = scheduler
        self.max_models, self.layers_per_unit = max_models, layers_per_unit
        self._send = send  # to the tokenizer manager
        self.trainers: dict[str, TinkerTrainer] = {}

    # -- control requests ----------------------------------------------------------------------------
    def create(self, request: TinkerCreateModel) -> Ack:
        self._new_trainer(request.model_id, request.lora, request.seed)
        return Ack()

    def _new_trainer(self, model_id: str, lora: LoraSpec, seed: int) -> TinkerTrainer:
        if model_id in self.trainers:
            raise Conflict("model_id", f"{model_id!r} exists")
        if len(self.trainers) >= self.max_models:
            raise TooManyJobs(
                "model_id", f"{len(self.trainers)} training clients exist, the most this server keeps"
            )
        with training_mode():
            model, _ = bind_training_model(
                self.scheduler.tp_worker.model_runner.model, self.scheduler.server_args.model_path
            )
            trainer = self.trainers[model_id] = TinkerTrainer(
                model, lora, seed, layers_per_unit=self.layers_per_unit
            )
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
                del self.trainers[request.model_id]
            raise SpecError("path", str(exc)) from None
        logger.info("tinker %s loaded from %s (step %d)", request.model_id, request.directory, trainer.steps)
        return Ack()

    def drop(self, request: TinkerDropModel) -> Ack:
        trainer = self.trainers.pop(request.model_id, None)
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
        trainer = self.trainers.get(model_id)
        if trainer is None:
            raise NotFound("model_id", f"no training client {model_id!r} on this server")
        return trainer

    def _answer(self, request_id: str, outcome: Outcome) -> None:
        self._send(HarliTinkerResult(request_id=request_id, outcome=outcome))

    # -- units ---------------------------------------------------------------------------------------
    @property
    def busy(self) -> TinkerTrainer | None:
        """The trainer whose requests run next (the oldest model with work queued)."""
        return next((t for t in self.trainers.values() if t.pending), None)

    def peek(self, count: int) -> list[FinetuneWork]:
        trainer = self.busy
        return trainer.peek(count) if trainer is not None else []

    def fail_head(self, trainer: TinkerTrainer, exc: Exception) -> None:
        """A unit of ``trainer``'s head request raised: that request fails, the others go on."""
        trainer.drop_head(exc)
