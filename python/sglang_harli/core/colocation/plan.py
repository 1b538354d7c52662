"""What the scheduler runs of a finetune job in one place of its loop: a plan, decided once per place.

A place is either the gap before the next decode step (``Slot.next_decode`` set: the work lands in the
running requests' token interval, so the policy admits a counted prefix of units) or an idle slice (no
request waits for a token: train flat out for a time budget, yielding to the first arrival). The policy's
``Admission`` names its SM split; the plan holds the split itself, looked up once, so the unit loop never
searches the menu by name.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from sglang_harli.core.colocation.partition import SMSplit
from sglang_harli.core.colocation.predictor import DecodeShape


class Slot(msgspec.Struct, frozen=True, kw_only=True):
    """Where finetune work may run now."""

    next_decode: DecodeShape | None
    """The decode step the work runs before; ``None``: no request waits for a token (an idle slice)."""
    may_start: bool
    """A queued job may start here (no request is running); one that waited long starts anyway."""


class BesideDecode(msgspec.Struct, frozen=True, kw_only=True):
    """Run ``units`` of the coming units before the next decode step, on ``split``."""

    label: ClassVar[str] = "decode"
    """How metrics label the units it runs."""

    units: int
    split: SMSplit


class IdleSlice(msgspec.Struct, frozen=True, kw_only=True):
    """No decode work: run units flat out for ``budget_s`` on ``split``, yielding to any arrival."""

    label: ClassVar[str] = "idle"

    budget_s: float
    split: SMSplit


WorkPlan = BesideDecode | IdleSlice
