"""The Tinker API's optimizer parameters, as the SDK sends them with ``optim_step``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdamParams:
    """``optim_step``'s parameters, as the SDK's ``AdamParams`` sends them (decoupled weight decay)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 does not clip."""
