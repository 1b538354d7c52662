"""``HarliScheduler``: SGLang's scheduler with Harli's two hook points.

Harli never forks SGLang's event loops. It subclasses the stock ``Scheduler`` and overrides the two
methods every loop (normal, overlap, PD-decode) already calls: ``process_batch_result`` after each forward,
and ``on_idle`` when there is nothing to run. Those are the only places where finetune work may be
admitted, so decode scheduling itself stays SGLang's.

After a decode step the QoS policy is asked how many finetune units fit before the next one
(``core.colocation``): the work runs in the gap between two tokens of every running request, so it is
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

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.jobs import SpecError
from sglang_harli.core.predictor import DecodeShape
from sglang_harli.core.stats import StepRecorder
from sglang_harli.srt.allocator import LendingInvariantChecker
from sglang_harli.srt.control import (
    ControlError,
    HarliControlReq,
    HarliControlReqOutput,
    register_control_types,
    reply,
)
from sglang_harli.srt.finetune import FinetuneService
from sglang_harli.srt.metrics import HarliMetrics

logger = logging.getLogger(__name__)


class HarliScheduler(Scheduler):
    def __init__(self, server_args, *args, **kwargs):
        super().__init__(server_args, *args, **kwargs)
        self.harli_config: HarliConfig = getattr(server_args, "_harli_config", None) or HarliConfig()
        self.harli_steps = StepRecorder(self.harli_config)
        # The latest decode forward (its batch shape and run time), and whether anything other than a
        # decode forward ran since the last decode result. Between two decode results exactly one
        # forward runs: that step's own in the normal loop, the next step's in the overlap loop.
        self._harli_forward: tuple[DecodeShape, float] | None = None
        self._harli_chain_broken = True
        # The latest non-decode batch ran while no request was waiting for a next token.
        self._harli_fresh_batch = False
        # A request arrived while finetune work ran beside decode: the next batch is decode, then prefill.
        self._harli_decode_first = False
        self.harli_metrics = None
        if self.server_args.enable_metrics:
            labels = dict(getattr(self.metrics_collector, "labels", None) or {})
            self.harli_metrics = HarliMetrics(labels, self.harli_config.tpot_slo_ms / 1e3)
        self.harli_finetune = FinetuneService(self, self.harli_config, self.harli_metrics)
        self.harli_finetune.run_profile()
        self._harli_commands = {"stats": self._harli_stats, **self.harli_finetune.commands}
        self._request_dispatcher += TypeBasedDispatcher([(HarliControlReq, self.handle_harli_control)])
        logger.info("Harli scheduler ready: %s", msgspec.json.encode(self.harli_config).decode())

    def init_invariant_checker(self) -> None:
        """SGLang's idle leak check, told about KV pages lent to the trainer."""
        super().init_invariant_checker()
        self.invariant_checker.__class__ = LendingInvariantChecker

    # -- loop hooks --------------------------------------------------------------------------------
    def get_next_batch_to_run(self, *args, **kwargs):
        """Lent KV pages come back before SGLang admits or grows anything that might need them."""
        self.harli_finetune.lending.ensure_reserve()
        return super().get_next_batch_to_run(*args, **kwargs)

    def process_decode_queue(self, *args, **kwargs):
        """PD decode: lent pages come back before SGLang pre-allocates KV for arriving transfers."""
        self.harli_finetune.lending.ensure_reserve()
        return super().process_decode_queue(*args, **kwargs)

    def _should_defer_prefill(self, running_batch) -> bool:
        """Decode first when a request arrived during finetune work admitted beside decode.

        The work has already spent part of the running requests' token interval; a prefill on top
        of it is what pushes an interval over the SLO (the unit in flight cannot be recalled). The
        decode step goes first, closing the interval the policy budgeted, and the prefill follows in
        the next one, as it would with no training. The newcomer's first token comes one decode step
        later. Not with --tp-size > 1, where only rank 0 sees the arrival and every rank must choose
        the same batch."""
        if self._harli_decode_first:
            self._harli_decode_first = False
            if not running_batch.is_empty() and not running_batch.is_prefill_only:
                self.harli_steps.record_deferred_prefill()
                return True
        return super()._should_defer_prefill(running_batch)

    def run_batch(self, batch, *args, **kwargs):
        """On CPU the forward runs inside this call, so its duration is the step's solo latency."""
        started = time.perf_counter()
        result = super().run_batch(batch, *args, **kwargs)
        elapsed = time.perf_counter() - started
        self.harli_steps.record_forward(elapsed)
        if batch.forward_mode.is_decode():
            self._harli_forward = (_shape(batch.reqs, batch.seq_lens_sum or 0), elapsed)
        else:
            self._harli_chain_broken = True
            self._harli_fresh_batch = all(req.finished() for req in self.running_batch.reqs)
        return result

    def process_batch_result(self, batch, result):
        super().process_batch_result(batch, result)
        colocation = self.harli_finetune.colocation
        if not batch.forward_mode.is_decode():
            if batch.forward_mode.is_extend():
                self.harli_steps.record_prefill(int(batch.extend_num_tokens or 0))
            if self._harli_fresh_batch:
                colocation.chain_restarts()  # only new requests: their first tokens start the chain
                self._harli_chain_broken = self._harli_fresh_batch = False
        elif self._harli_forward is not None:
            shape, step_s = self._harli_forward
            self.harli_steps.record_decode(step_s, shape.batch_size)
            if self._harli_chain_broken:
                colocation.other_batch()  # a prefill ran since the last decode result
            record = colocation.decode_done(shape, step_s)
            if record is not None and self.harli_metrics is not None:
                self.harli_metrics.interval(record)
                self.harli_metrics.refresh(colocation, self.harli_finetune.lending)
        if batch.forward_mode.is_decode():
            self._harli_chain_broken = False
        self.after_batch(batch)

    def on_idle(self):
        super().on_idle()
        self._harli_chain_broken = True
        self.harli_finetune.colocation.idle()
        self.when_idle()

    def maybe_sleep_on_idle(self):
        """SGLang's --sleep-on-idle waits up to a second for a request; never while training is pending."""
        if not self.harli_finetune.has_work:
            super().maybe_sleep_on_idle()

    def after_batch(self, batch) -> None:
        """Called after every batch's results are processed: where finetune work joins decode."""
        if self.harli_finetune.has_work:
            self._harli_train(self._harli_plan_after_batch, batch)

    def when_idle(self) -> None:
        """Called whenever the scheduler has no batch to run: where finetune work runs flat out."""
        finetune = self.harli_finetune
        if finetune.has_work:
            self._harli_train(self._harli_plan_idle)
        if self.harli_metrics is not None:
            self.harli_metrics.refresh(finetune.colocation, finetune.lending)

    def _harli_plan_after_batch(self, batch) -> _Plan | None:
        finetune = self.harli_finetune
        running = [req for req in batch.reqs if not req.finished()]
        if not batch.forward_mode.is_decode() and running:
            return None  # a prefill already spent this token interval of the running requests
        # A PD decode instance never prefills: requests whose KV has arrived join the next decode step.
        pd_decode = self.disaggregation_mode == DisaggregationMode.DECODE
        if (self.waiting_queue and not pd_decode) or self._harli_request_pending():
            return None  # the next forward is a prefill: it, not training, gets the rest of the interval
        started = time.perf_counter()
        upcoming = finetune.upcoming(may_start=not running)
        if not upcoming:
            return None
        joining = list(self.waiting_queue) if pd_decode else []
        context = sum(len(req.origin_input_ids) + len(req.output_ids) for req in (*running, *joining))
        next_step = _shape([*running, *joining], context) if running or joining else None
        return self._harli_admit(next_step, upcoming, started)

    def _harli_plan_idle(self) -> _Plan | None:
        started = time.perf_counter()
        upcoming = self.harli_finetune.upcoming(may_start=True)
        return self._harli_admit(None, upcoming, started) if upcoming else None

    def _harli_admit(self, next_step: DecodeShape | None, upcoming, started: float) -> _Plan:
        """What the policy admits before ``next_step`` (``None``: no decode work, a time slice)."""
        admission = self.harli_finetune.colocation.admit(next_step, upcoming, started=started)
        if next_step is None:  # flat out for the slice, beyond the units listed
            return _Plan(units=1_000_000, budget_s=admission.budget_s, split=admission.split, when="idle")
        return _Plan(units=admission.units, budget_s=None, split=admission.split, when="decode")

    def _harli_train(self, plan_fn, *args) -> None:
        """Run the finetune work ``plan_fn`` admits. With --tp-size N, rank 0 plans (it alone sees the
        request socket, and the ranks' clocks differ) and every rank starts the same job and runs the
        same units (``srt.tensor_parallel``)."""
        finetune = self.harli_finetune
        agreement = finetune.agreement
        idle_before = finetune.trainer is None
        plan = plan_fn(*args) if agreement.leader else None
        if agreement.group is not None:
            plan = self._harli_agree(plan, started=idle_before and finetune.trainer is not None)
        if plan is not None and plan.units:
            ran = finetune.run(
                units=plan.units,
                budget_s=plan.budget_s,
                split=plan.split,
                when=plan.when,
                should_yield=self._harli_request_pending,
            )
            if ran and plan.when == "decode" and agreement.group is None:
                self._harli_decode_first = self._harli_request_pending()

    def _harli_agree(self, plan: _Plan | None, *, started: bool) -> _Plan | None:
        finetune = self.harli_finetune
        splits = [split.name for split in finetune.partitioner.splits]
        values = None
        if finetune.agreement.leader:
            values = [float(started), 0.0, -1.0, 0.0, 0.0]
            if plan is not None:
                budget = -1.0 if plan.budget_s is None else plan.budget_s
                split = splits.index(plan.split) if plan.split in splits else 0
                values = [float(started), float(plan.units), budget, float(split), float(plan.when == "idle")]
        start, units, budget, split, idle = finetune.agreement.agree(values, 5)
        if not finetune.agreement.leader:
            if start and finetune.trainer is None:
                finetune.start_next()
            if units:
                when = "idle" if idle else "decode"
                plan = _Plan(
                    units=int(units),
                    budget_s=None if budget < 0 else budget,
                    split=splits[int(split)],
                    when=when,
                )
            else:
                plan = None
        return plan

    def _harli_request_pending(self) -> bool:
        """A request (or any message) is waiting on the tokenizer socket: decode wins, training yields."""
        socket = getattr(self.ipc_channels, "recv_from_tokenizer", None)
        try:
            return bool(socket.poll(0, zmq.POLLIN))
        except (AttributeError, zmq.ZMQError):
            return False

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
            "colocation": self.harli_finetune.colocation.snapshot(),
        }


class _Plan(msgspec.Struct, frozen=True):
    """The finetune work of one token interval (or one idle slice)."""

    units: int
    budget_s: float | None
    split: str
    when: str


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
