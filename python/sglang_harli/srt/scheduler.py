"""``HarliScheduler``: SGLang's scheduler with Harli's two hook points.

Harli never forks SGLang's event loops. It subclasses the stock ``Scheduler`` and overrides the two
methods every loop (normal, overlap, PD-decode) already calls: ``process_batch_result`` after each forward,
and ``on_idle`` when there is nothing to run. Those are the only places where finetune work may be
admitted, so decode scheduling itself stays SGLang's.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import msgspec
from sglang.srt.managers import scheduler as sglang_scheduler
from sglang.srt.managers.scheduler import Scheduler
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.jobs import SpecError
from sglang_harli.core.stats import StepRecorder
from sglang_harli.srt.control import (
    ControlError,
    HarliControlReq,
    HarliControlReqOutput,
    register_control_types,
    reply,
)
from sglang_harli.srt.finetune import FinetuneService

logger = logging.getLogger(__name__)


class HarliScheduler(Scheduler):
    def __init__(self, server_args, *args, **kwargs):
        super().__init__(server_args, *args, **kwargs)
        self.harli_config: HarliConfig = getattr(server_args, "_harli_config", None) or HarliConfig()
        self.harli_steps = StepRecorder(self.harli_config)
        # Launch times of batches whose results are not processed yet. Results come back in launch order
        # in every loop, including the overlap loop where the next batch launches first.
        self._harli_launched: deque[float] = deque(maxlen=8)
        self.harli_finetune = FinetuneService(self, self.harli_config)
        self._harli_commands = {"stats": self._harli_stats, **self.harli_finetune.commands}
        self._request_dispatcher += TypeBasedDispatcher([(HarliControlReq, self.handle_harli_control)])
        logger.info("Harli scheduler ready: %s", msgspec.json.encode(self.harli_config).decode())

    # -- loop hooks --------------------------------------------------------------------------------
    def run_batch(self, batch, *args, **kwargs):
        self._harli_launched.append(time.perf_counter())
        return super().run_batch(batch, *args, **kwargs)

    def process_batch_result(self, batch, result):
        super().process_batch_result(batch, result)
        launched = self._harli_launched.popleft() if self._harli_launched else None
        if batch.forward_mode.is_decode():
            if launched is not None:
                self.harli_steps.record_decode(time.perf_counter() - launched, batch.batch_size())
        elif batch.forward_mode.is_extend():
            self.harli_steps.record_prefill(int(batch.extend_num_tokens or 0))
        self.after_batch(batch)

    def on_idle(self):
        super().on_idle()
        self._harli_launched.clear()
        self.when_idle()

    def maybe_sleep_on_idle(self):
        """SGLang's --sleep-on-idle waits up to a second for a request; never while training is pending."""
        if not self.harli_finetune.has_work:
            super().maybe_sleep_on_idle()

    def after_batch(self, batch) -> None:
        """Called after every batch's results are processed: where finetune work joins decode."""
        if self.harli_config.train_units_per_step and self.harli_finetune.has_work:
            self.harli_finetune.run(units=self.harli_config.train_units_per_step)

    def when_idle(self) -> None:
        """Called whenever the scheduler has no batch to run: where finetune work runs flat out."""
        if self.harli_finetune.has_work:
            self.harli_finetune.run(units=1_000_000, budget_s=self.harli_config.idle_train_ms / 1000)

    # -- control -----------------------------------------------------------------------------------
    def handle_harli_control(self, req: HarliControlReq) -> HarliControlReqOutput:
        handler = self._harli_commands.get(req.command)
        if handler is None:
            return reply({"error": f"unknown harli command {req.command!r}"}, status=400)
        try:
            return reply(handler(req.payload))
        except ControlError as exc:
            return reply({"error": exc.message}, status=exc.status)
        except SpecError as exc:
            return reply({"error": str(exc), "field": exc.field}, status=exc.status)
        except Exception as exc:  # a broken command must never take the scheduler down
            logger.exception("harli command %s failed", req.command)
            return reply({"error": f"{type(exc).__name__}: {exc}"}, status=500)

    def _harli_stats(self, payload: bytes):
        return {
            **msgspec.structs.asdict(self.harli_steps.snapshot()),
            "finetune": self.harli_finetune.snapshot(),
        }


def run_harli_scheduler_process(*args, **kwargs):
    """Scheduler process entry point handed to ``launch_server``; module-level so it can be spawned."""
    register_control_types()
    sglang_scheduler.Scheduler = HarliScheduler
    return sglang_scheduler.run_scheduler_process(*args, **kwargs)
