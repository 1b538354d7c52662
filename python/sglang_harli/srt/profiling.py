"""Start-up profiling of finetune unit costs, and the predictor cache it fills.

Before the first job, a short pass times each kind of unit on synthetic data, over a throwaway LoRA on
the served weights, so the QoS policy can admit work beside decode from the first step instead of
waiting for the job's own units to teach it. The fitted predictor is cached per model shape, hardware,
unit granularity and deployment, and saved again whenever a job lets go of the trainer, so the next
start begins from everything learnt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import torch

from sglang_harli.core.colocation.loop import new_predictor
from sglang_harli.core.colocation.predictor import LatencyPredictor
from sglang_harli.core.colocation.work import WORK_KINDS
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.training.lora import training_mode
from sglang_harli.core.training.tensor_parallel import TensorParallel
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.core.wire.stats import ProfileStats
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt.weights import bind_training_model

logger = logging.getLogger(__name__)

PROFILE_BUDGET_S = 3.0


class StartupProfile:
    def __init__(self, scheduler, config: HarliConfig, tensor_parallel: TensorParallel | None):
        self.scheduler, self.config, self.tensor_parallel = scheduler, config, tensor_parallel
        self.path = self._cache_path()
        self.stats = ProfileStats(state="not run")

    def _cache_path(self) -> Path:
        """One cache entry per model shape, hardware, unit granularity and deployment: a PD decode
        instance's steps (prebuilt batches, transfers in flight) are not a co-located server's, and one
        role's fit restored in the other admits by the wrong costs until it has relearnt them."""
        runner = self.scheduler.tp_worker.model_runner
        server_args = self.scheduler.server_args
        config_file = Path(server_args.model_path) / "config.json"
        device = getattr(runner, "device", "cpu")
        if str(device).startswith("cuda"):
            hardware = torch.cuda.get_device_name()
        else:
            hardware = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
        key = json.dumps(
            [
                config_file.read_text() if config_file.is_file() else server_args.model_path,
                hardware,
                str(getattr(runner, "dtype", "")),
                self.config.layers_per_unit,
                torch.__version__,
                str(server_args.disaggregation_mode),
                str(server_args.attention_backend),
            ]
        )
        return cache_root() / "predictor" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def cached_predictor(self) -> LatencyPredictor | None:
        """The cached fit for this deployment, unless refreshing (or with TP, where every rank profiles
        in step and no cache is read or written)."""
        if self.config.profile == "refresh" or self.tensor_parallel is not None:
            return None
        try:
            predictor = new_predictor(json.loads(self.path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.stats = ProfileStats(state="cached", path=str(self.path))
        return predictor

    def save(self, predictor: LatencyPredictor) -> None:
        if self.tensor_parallel is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(predictor.state()))
            temporary.replace(self.path)
        except OSError:
            logger.warning("could not cache the latency predictor at %s", self.path, exc_info=True)

    def run(self, predictor: LatencyPredictor, *, skip: bool) -> None:
        """Time every kind of unit on synthetic data, within ``PROFILE_BUDGET_S``, into ``predictor``.

        Runs at start-up, before the server takes requests; ``skip`` (no finetuning on this server, or
        LoRA serving off), ``--harli-profile skip`` or a cache entry skip it."""
        if self.stats.state == "cached":
            return
        if skip or self.config.profile == "skip":
            self.stats = ProfileStats(state="skipped")
            return
        started = time.perf_counter()
        try:
            units = self._time_units(predictor, started)
        except Exception as exc:  # profiling is an optimisation; the predictor also learns online
            logger.warning("finetune profiling failed: %s", exc, exc_info=True)
            self.stats = ProfileStats(state="failed", error=f"{type(exc).__name__}: {exc}")
            return
        learnt = predictor.snapshot().units
        self.stats = ProfileStats(
            state="profiled",
            seconds=round(time.perf_counter() - started, 3),
            units=units,
            kinds=[kind for kind in WORK_KINDS if kind in learnt and learnt[kind].samples],
            path=str(self.path),
        )
        self.save(predictor)
        logger.info("finetune unit costs profiled in %.2fs (%d units)", self.stats.seconds, units)

    def _time_units(self, predictor: LatencyPredictor, started: float) -> int:
        runner = self.scheduler.tp_worker.model_runner
        with training_mode():
            model, _ = bind_training_model(
                runner.model, self.scheduler.server_args.model_path, self.tensor_parallel
            )
            vocab = model.config.vocab_size
            generator = torch.Generator().manual_seed(0)
            examples = [
                Example(input_ids=ids, loss_mask=[True] * len(ids))
                for length in (32, 128, 64, 256)
                for ids in [torch.randint(vocab, (length,), generator=generator).tolist()]
            ]
            trainer = LoraTrainer(
                model,
                examples,
                LoraSpec(r=16, target_modules=["q_proj", "v_proj"]),
                TrainingSpec(epochs=1, micro_batch_size=1, gradient_accumulation_steps=2),
                layers_per_unit=self.config.layers_per_unit,
                tensor_parallel=self.tensor_parallel,
            )
            units = 0
            # With TP the ranks' clocks differ, so they agree on a unit count instead of a deadline.
            fixed = 4 * trainer.units_per_micro_batch if self.tensor_parallel is not None else None
            while units < fixed if fixed is not None else time.perf_counter() - started < PROFILE_BUDGET_S:
                upcoming = trainer.peek(1)
                if not upcoming:
                    break
                unit_started = time.perf_counter()
                trainer.run_unit()
                if units >= trainer.units_per_micro_batch:  # the first micro-batch warms caches up
                    predictor.observe_unit(upcoming[0], time.perf_counter() - unit_started)
                units += 1
        return units
