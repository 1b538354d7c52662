"""What the finetune side needs from the scheduler it lives in, named in small protocols.

``Host`` is SGLang's scheduler as the finetune rooms see it (``srt.host.SchedulerHost`` is the real one;
the engine-free tests give a fake over a plain transformers model): the served model to train over, its
tokenizer, the limits of its LoRA pool, and the two messages the rooms send to the HTTP side. ``Lending``
is the KV-page loan a job's trainer may keep its activations in (``srt.memory.lending.KvLending``);
``Agreement`` is how tensor-parallel ranks take rank 0's decisions (``srt.tensor_parallel``). Each has a
stand-in for a host without them: ``core.training.memory.TrainerMemory`` (no pages lent) and ``SOLO``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from sglang_harli.core.jobs.spec import ServingLimits
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.wire.control import AdapterVersion


class Host(Protocol):
    model_path: str
    """The served checkpoint's directory (its ``config.json`` shapes the training model)."""
    tokenizer: Any
    eos_ids: set[int]
    """The token ids the server stops generation on (evaluation's greedy probes stop there too)."""

    def bind_model(self, tensor_parallel=None) -> tuple[Any, dict[str, int]]:
        """A frozen transformers model over the served weights, and how many parameters share storage with
        them (``{"params": n, "shared_with_server": m}``)."""

    def serving_limits(self) -> ServingLimits:
        """What the serving LoRA pool holds: a job's adapter must fit it to be served."""

    def publish(self, version: AdapterVersion) -> None:
        """Ask the HTTP side (which owns the adapter names) to serve this version; the answer comes back as
        an ``AdapterServed`` control request."""

    def answer(self, request_id: str, outcome: Outcome) -> None:
        """A Tinker operation's outcome, for the future its client polls."""


class Lending(Protocol):
    hooks: Any
    """The trainer's saved-tensor hooks (``None``: activations stay in ordinary memory)."""
    place_grads: Callable | None
    micro_batch_done: Callable[[int], None]

    def attach(self, trainer) -> None: ...
    def detach(self) -> None: ...
    def prepare(self, tokens: int) -> bool:
        """Before a micro-batch of ``tokens`` starts: borrow what it needs; False: it must wait."""

    def out_of_memory(self) -> bool:
        """A unit ran out of room; True: its micro-batch was dropped, to be replayed with a larger loan."""


class Agreement(Protocol):
    leader: bool
    """This rank decides (rank 0, or the only rank)."""
    group: Any
    """The ranks' group, ``None`` with one rank."""

    def flag(self, value: bool) -> bool: ...
    def agree_plan(self, started: bool, plan, menu) -> tuple[bool, Any]: ...


class _Solo:
    """One rank: its own decisions stand."""

    leader = True
    group = None

    def flag(self, value: bool) -> bool:
        return value

    def agree_plan(self, started: bool, plan, menu):
        return started, plan


SOLO: Agreement = _Solo()
