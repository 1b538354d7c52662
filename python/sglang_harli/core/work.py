"""``FinetuneWork``: one admissible unit of finetune work, described by what its run time depends on.

The trainer announces its upcoming units in this form, the latency predictor learns a cost per kind from
it, and the QoS policy admits a prefix of them per decode step. Keeping the description small and free
of tensors lets the same policy run in the server, in the GPU benchmark and in the trace simulator.
"""

from __future__ import annotations

from typing import Literal

import msgspec

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
