"""What the activation store reports (``core.training.memory``), as ``/harli/stats`` sends it."""

from __future__ import annotations

import msgspec


class MemoryStats(msgspec.Struct, kw_only=True):
    lent_bytes: int
    """Capacity of the regions currently lent."""
    placed_bytes: int
    """Bytes of saved activations living in lent regions now."""
    ordinary_bytes: int
    """Bytes of saved activations in ordinary memory now (counted against the budget)."""
    peak_ordinary_bytes: int
    placed_total: int
    """Activations ever copied into lent regions."""
    spilled_bytes: int
    """Bytes of activations moved back to ordinary memory by reclaims."""
    reclaims: int
    budget_bytes: int | None
    last_micro_batch_bytes: int
    """Everything the latest micro-batch saved for backward (lent and ordinary): what lending must cover."""
    last_largest_bytes: int
    """Its largest saved tensor."""
    grad_bytes: int
    """LoRA gradient buffers living in lent regions now."""
    grads_moved_bytes: int
    """Bytes of gradient buffers moved out to ordinary memory by reclaims."""
