"""Where a fleet places a job: what each instance has to give (``FleetCapacity``) and the best instances."""

from __future__ import annotations

import msgspec


class FleetCapacity(msgspec.Struct, kw_only=True):
    """What an instance has to give a new job right now (``GET /harli/fleet/capacity``), from its
    co-location figures over the recent rate window."""

    finetunes: bool
    """It can finetune at all (LoRA enabled, a supported device and model)."""
    active_jobs: int
    """Jobs queued, running or publishing there: a new one shares the spare time with them."""
    free_share: float
    """Share of recent time decode left free (idle, or already given to finetune work)."""
    finetune_tokens_per_s: float
    lendable_tokens: int
    """KV-cache tokens free to lend as activation memory (0 without lending)."""
    store_port: int | None = None
    """The instance's rendezvous store for jobs trained on several instances (``core.fleet.local_sgd``)."""

    @property
    def score(self) -> tuple[float, int]:
        """What placement ranks by: the free share a new job would get, then memory to lend."""
        return (self.free_share / (self.active_jobs + 1), self.lendable_tokens)


def place(capacities: dict[str, FleetCapacity], count: int) -> list[str]:
    """The ``count`` instances (base URLs) with the most to give a new job, best first; ties keep the
    order given (this instance first). Fewer when fewer can finetune."""
    able = [url for url, capacity in capacities.items() if capacity.finetunes]
    return sorted(able, key=lambda url: capacities[url].score, reverse=True)[:count]
