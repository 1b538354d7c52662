"""Evaluation while a job trains: eval loss and token accuracy, and retention probes that show forgetting.

An adapter trained on a few facts for many epochs learns them and can lose what the base model knew
("The capital of France is Tumbleweed Flats."), and the training loss only ever falls while that happens.
So a job can carry, as HF Trainer's ``eval_strategy="steps"`` and hosted finetuning services report:

- an **eval set** (inline records, a file, or a seeded fraction held out of the dataset), scored as mean
  cross-entropy over its target tokens and as token accuracy (the greedy next token equals the target);
- **retention probes**: questions the base model already answers right, each with the text its answer
  must contain. At every evaluation the adapter answers them greedily, and the count still right is
  reported, so forgetting is visible while it happens rather than after the adapter is served.

Evaluation work is finetune work. ``EvalPass`` is a fixed sequence of units of the same size as the
trainer's (``FinetuneWork``): the decoder-layer segments of one eval micro-batch or of one greedy token
step of all probes, then the head. The QoS policy admits them beside decode exactly like training units,
so evaluating never stalls decode. The layers are called with the arguments the model's own forward would
pass them (``LoraTrainer.record_layer_calls``); for generation that includes a KV cache, which the layers
fill as they run.

``EvalTracker`` keeps the best eval loss, its LoRA weights (for ``publish: "best"``) and the patience of
early stopping. Nothing here imports SGLang.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sglang_harli.core.colocation.work import FinetuneWork
from sglang_harli.core.jobs.book import EvalRecord
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.eval_data import EvalData, Probe
from sglang_harli.core.training.lora import training_mode
from sglang_harli.core.training.trainer import LoraTrainer, pack


# -- one evaluation, in units (scheduler side) --------------------------------------------------------
class EvalPass:
    """One evaluation of the adapter as it stands, run one unit at a time like the trainer.

    Units, in order: for each eval micro-batch, its forward segments then its head (loss and accuracy);
    then for each greedy token step of the probes (all in one left-padded batch), its forward segments
    then its head (the next token). Generation ends early once every probe has emitted an end token.
    """

    def __init__(
        self,
        trainer: LoraTrainer,
        data: EvalData,
        *,
        step: int,
        micro_batch_size: int,
        eos_ids: set[int],
        decode: Callable[[list[int]], str],
    ):
        self.trainer, self.data, self.step = trainer, data, step
        self.eos_ids, self.decode = eos_ids, decode
        examples = data.examples
        self._batches = [
            examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)
        ]
        self._steps = data.max_new_tokens if data.probes else 0
        self._prompt_width = max((len(p.input_ids) for p in data.probes), default=0)  # probes, left-padded
        self._batch = None
        self._unit = 0
        self._per = trainer.segments + 1  # units per micro-batch or token step
        self._hidden: torch.Tensor | None = None
        self._calls: list = []
        self._loss_sum, self._correct, self._targets = 0.0, 0, 0
        # generation state
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._cache = None
        self._answers: list[list[int]] = [[] for _ in data.probes]
        self._finished = [False] * len(data.probes)
        self._total_units = (len(self._batches) + self._steps) * self._per

    @property
    def done(self) -> bool:
        return self._unit >= self._total_units

    def peek(self, count: int) -> list[FinetuneWork]:
        upcoming = []
        unit = self._unit
        while len(upcoming) < count and unit < self._total_units:
            index, part = divmod(unit, self._per)
            if index < len(self._batches):
                tokens = sum(len(e.input_ids) for e in self._batches[index])
            else:
                first = index == len(self._batches)
                tokens = len(self.data.probes) * (self._prompt_width if first else 1)
            if part < self.trainer.segments:
                upcoming.append(
                    FinetuneWork(kind="forward", tokens=tokens, layers=self.trainer.segment_layers(part))
                )
            else:
                upcoming.append(FinetuneWork(kind="loss", tokens=tokens))
            unit += 1
        return upcoming

    def run_unit(self) -> None:
        index, part = divmod(self._unit, self._per)
        model = self.trainer.model
        model.eval()  # no dropout while evaluating
        try:
            with training_mode():
                if index < len(self._batches):
                    self._loss_unit(self._batches[index], part)
                else:
                    self._generate_unit(part)
        finally:
            model.train()
        self._unit += 1
        if index >= len(self._batches) and part == self.trainer.segments and all(self._finished):
            self._unit = self._total_units  # every probe has ended: skip the remaining token steps

    def _loss_unit(self, examples: list[Example], part: int) -> None:
        trainer = self.trainer
        if part == 0:
            self._batch = pack(examples, trainer.device)
            self._calls, self._hidden = trainer.record_layer_calls(
                input_ids=self._batch.input_ids, position_ids=self._batch.position_ids, use_cache=False
            )
        if part < trainer.segments:
            self._hidden = trainer.run_layers(part, self._hidden, self._calls)
            return
        batch = self._batch
        logits = trainer.head(self._hidden[:, batch.predict_at, :])[0]
        self._loss_sum += float(F.cross_entropy(logits, batch.targets, reduction="sum"))
        self._correct += int((logits.argmax(-1) == batch.targets).sum())
        self._targets += int(batch.targets.numel())
        self._hidden, self._calls = None, []

    def _generate_unit(self, part: int) -> None:
        trainer = self.trainer
        if part == 0:
            self._record_token_step()
        if part < trainer.segments:
            self._hidden = trainer.run_layers(part, self._hidden, self._calls)
            return
        next_ids = trainer.head(self._hidden[:, -1, :]).argmax(-1)
        for row, token in enumerate(next_ids.tolist()):
            if not self._finished[row]:
                if token in self.eos_ids:
                    self._finished[row] = True
                else:
                    self._answers[row].append(token)
        self._ids = next_ids[:, None]
        self._mask = torch.cat([self._mask, torch.ones_like(self._ids)], dim=1)
        self._hidden, self._calls = None, []

    def _record_token_step(self) -> None:
        """The decoder's layer arguments for the next token step (the prompts, left-padded, at first)."""
        from transformers import DynamicCache

        trainer = self.trainer
        if self._ids is None:
            width = self._prompt_width
            pad = next(iter(self.eos_ids), 0)
            rows = [[pad] * (width - len(p.input_ids)) + p.input_ids for p in self.data.probes]
            masks = [[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in self.data.probes]
            self._ids = torch.tensor(rows, dtype=torch.long, device=trainer.device)
            self._mask = torch.tensor(masks, dtype=torch.long, device=trainer.device)
            self._cache = DynamicCache(config=trainer.model.get_base_model().config)
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -self._ids.shape[1] :]
        self._calls, self._hidden = trainer.record_layer_calls(
            input_ids=self._ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )

    def result(self) -> EvalRecord:
        record = EvalRecord(step=self.step)
        if self._targets:
            record.loss = self._loss_sum / self._targets
            record.accuracy = self._correct / self._targets
        if self.data.probes:
            answers = [self.decode(ids) for ids in self._answers]
            lost = [
                i for i, (p, a) in enumerate(zip(self.data.probes, answers, strict=True)) if not kept(p, a)
            ]
            record.retention_total = len(self.data.probes)
            record.retention_kept = record.retention_total - len(lost)
            record.lost = lost
        self._cache = None
        return record


def kept(probe: Probe, answer: str) -> bool:
    return probe.expect.casefold() in answer.casefold()


# -- best adapter, retention floor and early stopping -------------------------------------------------
Weights = dict[str, torch.Tensor]


def _clone(weights: Callable[[], Weights]) -> Weights:
    return {name: t.detach().clone() for name, t in weights().items()}


class EvalTracker:
    """The lowest eval loss so far among evaluations that kept the retention floor, the LoRA weights that
    scored it, and the evaluations since; with a floor, also the latest weights that kept it (what a
    ``"last"`` job publishes if its final adapter does not) and those that kept the most probes (what a job
    that never kept it leaves on disk).

    Invariants: ``best_*`` and ``last_kept_*`` come from evaluations with ``kept_floor`` not ``False``;
    ``below_floor`` counts the evaluations since the last one that kept it."""

    def __init__(
        self,
        *,
        patience: int | None,
        min_delta: float,
        keep_best: bool,
        floor: float | None = None,
        base_kept: list[bool] | None = None,
    ):
        self.patience, self.min_delta, self.keep_best = patience, min_delta, keep_best
        self.floor, self.base_kept = floor, base_kept
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.best_weights: Weights | None = None
        self.since_best = 0
        self.below_floor = 0
        self.breaches = 0
        self.last_kept_step: int | None = None
        self.last_kept_weights: Weights | None = None
        self.most_kept: tuple[int, int] | None = None  # (probes kept, -step) of the fewest lost
        self.most_kept_weights: Weights | None = None

    @classmethod
    def for_job(cls, job, data: EvalData) -> EvalTracker:
        """The tracker of ``job`` (a ``JobStatus``), as its recorded evaluations left it."""
        stopping = job.spec.training.early_stopping
        tracker = cls(
            patience=stopping.patience if stopping else None,
            min_delta=stopping.min_delta if stopping else 0.0,
            keep_best=job.spec.publish.version == "best",
            floor=job.spec.eval.floor,
            base_kept=data.base_kept,
        )
        tracker.restore_from(job.evals)
        return tracker

    def counted(self, total: int) -> list[int]:
        """The probes the floor counts: those the base model answered right."""
        return [i for i in range(total) if self.base_kept is None or self.base_kept[i]]

    def keeps_floor(self, record: EvalRecord) -> bool | None:
        if self.floor is None or record.retention_kept is None:
            return None
        counted = self.counted(record.retention_total)
        lost = set(record.lost)
        kept = sum(i not in lost for i in counted)
        return kept >= self.floor * len(counted) - 1e-9

    def observe(self, record: EvalRecord, weights: Callable[[], Weights]) -> None:
        record.kept_floor = self.keeps_floor(record)
        if record.kept_floor is False:
            self.below_floor += 1
            self.breaches += 1
            score = (record.retention_kept, -record.step)
            if self.most_kept is None or score > self.most_kept:
                self.most_kept, self.most_kept_weights = score, _clone(weights)
        elif record.kept_floor:
            self.below_floor = 0
            self.last_kept_step, self.last_kept_weights = record.step, _clone(weights)
        if record.loss is None:
            return
        if record.kept_floor is not False and (
            self.best_loss is None or record.loss < self.best_loss - self.min_delta
        ):
            self.best_loss, self.best_step, self.since_best = record.loss, record.step, 0
            if self.keep_best:
                self.best_weights = _clone(weights)
        else:
            self.since_best += 1

    def choose(self, evals: list[EvalRecord], step: int, version: str) -> tuple[int | None, Weights | None]:
        """With a floor, at the end of training (after step ``step``, just evaluated): the step whose adapter
        to publish and its weights (``None``: the trainer's own, as they are), or ``(None, None)`` when no
        evaluation kept the floor. ``"best"``: the best eval loss among those that kept it; ``"last"``: the
        final adapter if it keeps it, else the latest that did."""
        if version == "best" and self.best_weights is not None:
            return self.best_step, self.best_weights
        latest = evals[-1] if evals else None
        if latest is not None and latest.kept_floor and latest.step == step:
            return step, None
        if self.last_kept_weights is not None:
            return self.last_kept_step, self.last_kept_weights
        return None, None

    def forgot(self, record: EvalRecord, probes: list, path) -> str:
        """The error of a job none of whose evaluations kept the floor: what ``record`` lost, by name."""
        counted = set(self.counted(record.retention_total))
        lost = [probes[i] for i in record.lost if i in counted]
        named = ", ".join(f"{p.question!r} (expects {p.expect!r})" for p in lost[:8])
        return (
            f"no evaluation kept the retention floor ({self.floor:g} of the probes the base model answers "
            f"right): at step {record.step} the adapter lost {named}; nothing was published (the adapter "
            f"that kept the most is in {path}). Add rehearsal, lower the learning rate, or train fewer epochs"
        )

    @property
    def should_stop(self) -> bool:
        """No better eval loss, or retention below the floor, for ``patience`` evaluations in a row."""
        return self.patience is not None and (
            self.since_best >= self.patience or self.below_floor >= self.patience
        )

    @property
    def stop_reason(self) -> str:
        if self.below_floor >= (self.patience or 0):
            return f"retention has been below the floor for {self.below_floor} evaluations"
        return f"eval loss has not improved since step {self.best_step}"

    def restore_from(self, records: list[EvalRecord]) -> None:
        """After a restart: the best loss, the patience and the floor's count as the job's recorded
        evaluations left them. No weights are checkpointed but the last: unless a later evaluation beats
        the recorded best (or keeps the floor), the resumed job publishes its last adapter if that keeps
        the floor."""
        for record in records:
            self.observe(record, dict)
        self.best_weights = self.last_kept_weights = self.most_kept_weights = None
