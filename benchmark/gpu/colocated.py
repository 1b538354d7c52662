"""Finetune units beside decode steps: the same token interval for ``corun`` and ``replay``
(``Colocated``), and the trainer a co-located job runs (``colocated_trainer``)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from benchmark.gpu.device import Run
from benchmark.gpu.model import Decoder, lora_spec, make_examples


def _stopwatch(device: torch.device):
    """``core.colocation.timing``'s stopwatch (CUDA events, the host clock on a CPU): what the server times
    with."""
    from sglang_harli.core.colocation.timing import stopwatch

    return stopwatch(device)


def colocated_trainer(run: Run):
    """The trainer a co-located job runs: layer-wise units (the server's granularity) over the base
    weights, enough epochs never to finish within the run."""
    from sglang_harli.core.jobs.spec import TrainingSpec
    from sglang_harli.core.training.trainer import LoraTrainer

    s = run.settings
    examples = make_examples(s, count=max(8, s.train_examples), seed=s.seed + 1)
    training = TrainingSpec(
        epochs=1000,
        micro_batch_size=s.micro_batch,
        gradient_accumulation_steps=s.accumulation,
        max_seq_len=s.seq_max,
        seed=s.seed,
        learning_rate=1e-4,
        lr_scheduler="constant",
    )
    return LoraTrainer(
        run.base().bound_model(), examples, lora_spec(s), training, layers_per_unit=s.layers_per_unit
    )


@dataclasses.dataclass
class Interval:
    seconds: float
    """Wall clock from before the first launch to the end of the step and the units: what a client sees."""
    step_s: float
    """The decode step alone, on the device (CUDA events on the decode stream; the host clock on a CPU)."""
    units: list[tuple[Any, float, int]]
    """(work, device seconds, tokens of the micro-batch it completed) per unit that ran."""


class Colocated:
    """Runs one token interval: finetune units in a split and one decode step, as the server places them.

    In ``shared`` the units run first and the step follows on the whole device (time-sharing, one after
    the other). In a partitioned split the step is launched on the decode stream first and the units go
    into the split's green context (``Partitioner.finetune``) concurrently; the interval ends when both
    have. Unit costs are timed by ``core.colocation.timing``'s stopwatch inside the split, as
    ``core.runner.runner`` times them."""

    def __init__(self, run: Run, decoder: Decoder, trainer):
        self.run, self.decoder, self.trainer = run, decoder, trainer
        self.partitioner = run.partitioner()
        self.stopwatch = _stopwatch(run.device)

    def unit(self, split) -> tuple[Any, Any, int]:
        work = self.trainer.peek(1)[0]
        before = self.trainer.tokens_trained
        with self.partitioner.finetune(split):
            started = self.stopwatch.start()
            self.trainer.run_unit()
            timing = self.stopwatch.stop(started)
        return work, timing, self.trainer.tokens_trained - before

    def interval(self, batch: int, context: int, split, units: int) -> Interval:
        step = self.decoder.runner(batch, context)
        started = time.perf_counter()
        ran: list[tuple[Any, Any, int]] = []
        if not self.run.cuda:
            ran = [self.unit(split) for _ in range(units)]
            step_started = time.perf_counter()
            step()
            step_s = time.perf_counter() - step_started
        else:
            stream = self.run.decode_stream
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if split.partitioned and units:
                with torch.cuda.stream(stream):
                    begin.record()
                    step()
                    end.record()
                ran = [self.unit(split) for _ in range(units)]
            else:
                ran = [self.unit(split) for _ in range(units)]
                stream.wait_stream(torch.cuda.current_stream(self.run.device))
                with torch.cuda.stream(stream):
                    begin.record()
                    step()
                    end.record()
            torch.cuda.synchronize(self.run.device)
            step_s = begin.elapsed_time(end) / 1e3
        seconds = time.perf_counter() - started
        units_out = [(work, timing.seconds() or 0.0, tokens) for work, timing, tokens in ran]
        return Interval(seconds=seconds, step_s=step_s, units=units_out)

    def idle_unit(self, split) -> tuple[Any, float, int]:
        work, timing, tokens = self.unit(split)
        self.run.sync()
        return work, timing.seconds() or 0.0, tokens
