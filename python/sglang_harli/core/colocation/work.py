"""``FinetuneWork``: one admissible unit of finetune work, described by what its run time depends on.

The trainer announces its upcoming units in this form, the latency predictor learns a cost per kind from
it, and the QoS policy admits a prefix of them per decode step. Keeping the description small and free
of tensors lets the same policy run in the server, in the GPU benchmark and in the trace simulator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

SHARED = "shared"
"""The split in which finetune work shares the whole device with decode, taking turns with it: the only
split where there are no SM partitions (CPU, or partitioning off), and always the first of the menu."""

WorkKind = Literal["forward", "backward", "loss", "optimizer"]
WORK_KINDS: tuple[WorkKind, ...] = ("forward", "backward", "loss", "optimizer")


class FinetuneWork(msgspec.Struct, frozen=True, kw_only=True):
    kind: WorkKind
    """``forward``/``backward``: some decoder layers of one micro-batch; ``loss``: final norm, LM head and
    cross-entropy with their backward; ``optimizer``: clipping plus one AdamW step over the LoRA weights."""
    tokens: int = 0
    """Tokens in the micro-batch (0 for ``optimizer``)."""
    layers: int = 0
    """Decoder layers covered (``forward``/``backward`` only)."""
    params: int = 0
    """Trainable parameters updated (``optimizer`` only)."""

    @property
    def size(self) -> int:
        """The quantity the unit's run time grows with: token-layers, tokens, or parameters."""
        if self.kind in ("forward", "backward"):
            return self.tokens * self.layers
        if self.kind == "loss":
            return self.tokens
        return self.params


def ends_micro_batch(work: FinetuneWork, following: FinetuneWork | None) -> bool:
    """A micro-batch ends at its last backward unit: the one not followed by another backward."""
    return work.kind == "backward" and (following is None or following.kind != "backward")


def micro_batch_prefix(upcoming: Sequence[FinetuneWork]) -> int:
    """Units up to the end of the next micro-batch (its last backward unit), or a lone optimizer step."""
    if upcoming and upcoming[0].kind == "optimizer":
        return 1
    for index, work in enumerate(upcoming):
        if ends_micro_batch(work, upcoming[index + 1] if index + 1 < len(upcoming) else None):
            return index + 1
    return len(upcoming)


def look_ahead(units_per_micro_batch: int) -> int:
    """How many coming units the trainer offers the policy per decision: enough for a few micro-batches
    (so a policy can admit up to a whole one), few enough that planning stays cheap on deep models."""
    return min(4 * units_per_micro_batch + 1, 256)
