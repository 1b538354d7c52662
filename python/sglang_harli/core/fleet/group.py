"""A job trained on several instances, as messages and status: each member's assignment, its contribution,
and the group as one member sees it. No torch here: these cross process boundaries (``core.wire``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec


class GroupAssignment(msgspec.Struct, kw_only=True, frozen=True):
    """A member's place in a job trained on several instances, as the placing instance handed it out."""

    id: str
    """The group's name: the job's name and a nonce, so a resubmitted job never meets an old group."""
    members: list[str]
    """The members' base URLs, in rank order."""
    stores: list[str]
    """Each member's rendezvous store (``host:port``), in rank order."""
    rank: Annotated[int, msgspec.Meta(ge=0)]
    average_every: Annotated[int, msgspec.Meta(ge=1)]
    """Local optimizer steps between two averages (K)."""
    steps: Annotated[int, msgspec.Meta(ge=1)]
    """Optimizer steps every member trains: the smallest shard's plan, so every average has everyone."""


class Contribution(msgspec.Struct, kw_only=True):
    """What one member has trained, as of the last average it took part in."""

    steps: int = 0
    tokens_trained: int = 0
    examples: int = 0
    """The member's shard."""
    alive: bool = True
    """Still in the group (it was in the last generation formed)."""


class GroupStatus(msgspec.Struct, kw_only=True):
    """``JobStatus.group``: a job trained on several instances, as this member sees it."""

    assignment: GroupAssignment
    generation: int = 0
    """Times the group has been formed again after losing a member."""
    averages: int = 0
    """Averages this member has taken part in."""
    contributions: dict[str, Contribution] = msgspec.field(default_factory=dict)
    """Per member URL: its steps, tokens and shard, as of the last average."""


def shard(items: list, rank: int, members: int) -> list:
    """Member ``rank``'s shard: every ``members``-th item from the ``rank``-th."""
    return items[rank::members]
