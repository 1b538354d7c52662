"""``HarliScheduler``: SGLang's scheduler with Harli's hook points, as a thin mixin.

Harli never forks SGLang's event loops. ``HarliSchedulerMixin`` overrides methods every loop (normal,
overlap, PD-decode) already calls, and does three things in them: it reports loop events to the finetune
side (a forward ran, a batch's results arrived, the loop went idle), it offers the finetune side the two
places where work may run (after each batch's results, and when there is nothing to run), and it hands
Harli's control requests over. Everything else, interval state included, lives behind the one façade,
``srt.finetune.FinetuneService``; decode scheduling itself stays SGLang's.

After a decode step the work runs in the gap between two tokens of every running request, so it is
admitted against the predicted latency of the *next* step. After a prefill no work is admitted while
requests are decoding, because the prefill has already spent that token interval.
"""

from __future__ import annotations

import logging
import time

import msgspec
import torch
import zmq
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.managers import scheduler as sglang_scheduler
from sglang.srt.managers.scheduler import Scheduler
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.colocation.plan import Slot
from sglang_harli.core.colocation.predictor import DecodeShape
from sglang_harli.core.config import HarliConfig
from sglang_harli.srt.control import HarliControlReq, HarliControlReqOutput, register_control_types
from sglang_harli.srt.finetune import FinetuneService
from sglang_harli.srt.memory.allocator import LendingInvariantChecker

logger = logging.getLogger(__name__)

IDLE = Slot(next_decode=None, may_start=True)


class HarliSchedulerMixin:
    """Harli's overrides of SGLang's ``Scheduler``; ``self.harli`` is the finetune side."""

    harli: FinetuneService

    def __init__(self, server_args, *args, **kwargs):
        super().__init__(server_args, *args, **kwargs)
        self.harli_config: HarliConfig = getattr(server_args, "_harli_config", None) or HarliConfig()
        self.harli = FinetuneService(self, self.harli_config)
        self._request_dispatcher += TypeBasedDispatcher([(HarliControlReq, self.handle_harli_control)])
        logger.info("Harli scheduler ready: %s", msgspec.json.encode(self.harli_config).decode())

    def init_invariant_checker(self) -> None:
        """SGLang's idle leak check, told about KV pages lent to the trainer."""
        super().init_invariant_checker()
        self.invariant_checker.__class__ = LendingInvariantChecker

    def handle_harli_control(self, req: HarliControlReq) -> HarliControlReqOutput:
        return self.harli.handle(req)

    # -- before SGLang takes memory ------------------------------------------------------------------
    def get_next_batch_to_run(self, *args, **kwargs):
        self.harli.reclaim_kv()
        return super().get_next_batch_to_run(*args, **kwargs)

    def process_decode_queue(self, *args, **kwargs):
        """PD decode: lent pages come back before SGLang pre-allocates KV for arriving transfers."""
        self.harli.reclaim_kv()
        return super().process_decode_queue(*args, **kwargs)

    def _add_request_to_queue(self, req, is_retracted: bool = False):
        """A new request joins the waiting queue: its time to first token counts from here (a server that
        prefills; a PD decode instance gets its requests' first tokens from the prefill instance)."""
        super()._add_request_to_queue(req, is_retracted=is_retracted)
        queued = self.waiting_queue and self.waiting_queue[-1] is req
        if queued and not is_retracted and self.disaggregation_mode == DisaggregationMode.NULL:
            self.harli.request_arrived(req.rid, len(req.origin_input_ids))

    def _should_defer_prefill(self, running_batch) -> bool:
        """Decode first when a request arrived during finetune work admitted beside decode and the TTFT
        objective leaves room (``core.colocation.prefill``): the decode step closes the interval the
        policy budgeted, and the prefill follows in the next one. Not with --tp-size > 1, where only rank
        0 sees the arrival and every rank must choose the same batch."""
        decoding = not running_batch.is_empty() and not running_batch.is_prefill_only
        # SGLang asks every round; only a round with a request waiting to prefill has one to hold.
        if self.waiting_queue and self.harli.prefill_waits(decoding=decoding):
            return True
        return super()._should_defer_prefill(running_batch)

    # -- loop events ---------------------------------------------------------------------------------
    def run_batch(self, batch, *args, **kwargs):
        """On CPU the forward runs inside this call, so its duration is the step's solo latency; on CUDA
        the call launches it, and device events around it time the step (read when its result is in)."""
        timer = self.harli.stopwatch if self.harli.device_timed else None
        mark = timer.start() if timer is not None else None
        started = time.perf_counter()
        result = super().run_batch(batch, *args, **kwargs)
        elapsed = time.perf_counter() - started
        device = timer.stop(mark) if timer is not None else None
        if batch.forward_mode.is_decode():
            self.harli.forward_ran(_shape(batch.reqs, batch.seq_lens_sum or 0), elapsed, device=device)
        else:
            waiting = not all(req.finished() for req in self.running_batch.reqs)
            prefill = int(batch.extend_num_tokens or 0) if batch.forward_mode.is_extend() else 0
            self.harli.forward_ran(
                None, elapsed, device=device, nothing_waiting=not waiting, prefill_tokens=prefill
            )
        return result

    def process_batch_result(self, batch, result):
        super().process_batch_result(batch, result)
        extend = batch.forward_mode.is_extend()
        self.harli.result_arrived(
            decode=batch.forward_mode.is_decode(),
            prefill_tokens=int(batch.extend_num_tokens or 0) if extend else None,
            requests=[(req.rid, len(req.output_ids), req.finished()) for req in batch.reqs],
        )
        if self.harli.has_work:
            self.harli.train(lambda: self._harli_slot_after(batch), should_yield=self._harli_request_pending)

    def on_idle(self):
        super().on_idle()
        self.harli.went_idle()
        if self.harli.has_work:
            self.harli.train(lambda: IDLE, should_yield=self._harli_request_pending)
        self.harli.refresh_metrics()

    def maybe_sleep_on_idle(self):
        """SGLang's --sleep-on-idle waits up to a second for a request; never while training is pending."""
        if not self.harli.has_work:
            super().maybe_sleep_on_idle()

    # -- places for finetune work --------------------------------------------------------------------
    def _harli_slot_after(self, batch) -> Slot | None:
        """Where finetune work may run after ``batch``: before the next decode step, or an idle slice when
        no request waits for a token; ``None`` when the next forward is a prefill."""
        running = [req for req in batch.reqs if not req.finished()]
        if not batch.forward_mode.is_decode() and running:
            return None  # a prefill already spent this token interval of the running requests
        # A PD decode instance never prefills: requests whose KV has arrived join the next decode step.
        pd_decode = self.disaggregation_mode == DisaggregationMode.DECODE
        if (self.waiting_queue and not pd_decode) or self._harli_request_pending():
            return None  # the next forward is a prefill: it, not training, gets the rest of the interval
        joining = list(self.waiting_queue) if pd_decode else []
        context = sum(len(req.origin_input_ids) + len(req.output_ids) for req in (*running, *joining))
        next_step = _shape([*running, *joining], context) if running or joining else None
        return Slot(next_decode=next_step, may_start=not running)

    def _harli_request_pending(self) -> bool:
        """A request (or any message) is waiting on the tokenizer socket: decode wins, training yields."""
        socket = getattr(self.ipc_channels, "recv_from_tokenizer", None)
        try:
            return bool(socket.poll(0, zmq.POLLIN))
        except (AttributeError, zmq.ZMQError):
            return False


class HarliScheduler(HarliSchedulerMixin, Scheduler):
    """SGLang's ``Scheduler`` with Harli's finetune side."""


def _shape(reqs, context_tokens: int) -> DecodeShape:
    adapters = {req.lora_id for req in reqs if getattr(req, "lora_id", None)}
    return DecodeShape(batch_size=len(reqs), context_tokens=int(context_tokens), adapters=len(adapters))


def run_harli_scheduler_process(*args, **kwargs):
    """Scheduler process entry point handed to ``launch_server``; module-level so it can be spawned."""
    register_control_types()
    if not torch.cuda.is_available():
        # x86 computes on subnormal floats through a microcode path up to ~100x slower. KV rows no prefill
        # wrote (a PD decode instance with the fake transfer backend attends over whatever bytes a page
        # held, a lent page's trainer data included) are full of them, and no LLM result depends on values
        # below 1e-38. Set here, in the thread that runs decode and training, before its thread pool starts.
        torch.set_flush_denormal(True)
    sglang_scheduler.Scheduler = HarliScheduler
    return sglang_scheduler.run_scheduler_process(*args, **kwargs)
