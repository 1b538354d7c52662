"""One job trained on several instances: local SGD over a process group of the job's own.

With ``training.instances: N`` a job trains data-parallel on N instances of a fleet (``core.fleet``):
each member trains its own shard of the examples (member ``r`` of ``N`` takes every N-th one from the
r-th), and every ``training.average_every`` optimizer steps the members average their LoRA weights with
one all-reduce. Why not an all-reduce per step, as DDP does: the members are decode servers first, each
under its own decode load, so they train at different speeds; a collective per step would pace every
member at the busiest one's speed. Averaging every K local steps (local SGD, the inner loop of
DiLoCo with a plain average as the outer step) pays that wait once per K steps. The price is the
convergence trade-off local SGD is known for: between averages the members' adapters drift apart on
their shards, more so the larger K and the learning rate, so K trades fleet pacing against how close the
result comes to training on all the data in one place. Each member keeps its own AdamW moments; only
weights are averaged. All members train the same number of steps (the smallest shard's plan), so
every average has every member in it, and they all end on the same final average, bit for bit, so each
publishes the same adapter.

The group is a ``ProcessGroupGloo`` built from a ``TCPStore`` (CPU tensors, on a GPU host too: an
adapter is megabytes, and a gloo group never touches the decode forward's NCCL communicators).
Every member's scheduler hosts one rendezvous store for the instance's lifetime (``host_store``); a
generation of the group is formed on the store of its first member that answers. When a member dies,
the next all-reduce fails on the others (its sockets close); they form the next generation with whoever
checks in within ``REFORM_WINDOW_S``, and the round is averaged again among them: the job continues
from the last average plus the survivors' own steps since, on the survivors' shards. A member that
finds a generation formed without it (it was too late to check in) is left behind, and its copy of the
job fails with that reason; the group's adapter is still published by the others.

All of this runs in a thread of the member's scheduler, never in its loop: a member waiting for a slow
peer pauses only its own job's training, while decode goes on.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

import torch
import torch.distributed as dist

from sglang_harli.core.fleet.group import Contribution, GroupStatus

logger = logging.getLogger(__name__)

START_WINDOW_S = 600.0
"""How long the first generation waits for every member to reach its first average (a member may start
the job late, behind another job in its queue)."""
REFORM_WINDOW_S = 10.0
"""How long survivors of a failed round wait for each other to check in to the next generation."""
COLLECTIVE_TIMEOUT_S = 600.0
"""An all-reduce waits this long for a slow member before the group counts it as gone."""
CONNECT_TIMEOUT_S = 3.0
"""A member whose store does not answer within this long is skipped as a generation's host."""


class LeftBehind(RuntimeError):
    """The group formed a generation without this member; its copy of the job cannot rejoin."""


def host_store() -> dist.TCPStore:
    """This instance's rendezvous store, on a free port of every interface (``.port`` says which)."""
    return dist.TCPStore(
        "0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )


class LocalSgd:
    """One member's side of the group: ``start`` a round at each due step, ``poll`` for its average."""

    def __init__(self, status: GroupStatus, own_store: dist.Store):
        self.status = status
        self.assignment = status.assignment
        self._own_store = own_store
        self._members = list(range(len(self.assignment.members)))
        """Ranks (in the assignment) of the current generation."""
        self._group: dist.ProcessGroup | None = None
        self._formed = False  # a generation is formed (``_group`` is None when it has one member)
        self._thread: threading.Thread | None = None
        self._result: dict[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        for url in self.assignment.members:
            status.contributions.setdefault(url, Contribution())

    def due(self, step: int) -> bool:
        return step % self.assignment.average_every == 0 or step >= self.assignment.steps

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def start(self, weights: dict[str, torch.Tensor], mine: Contribution) -> None:
        """Average ``weights`` with the group's, in the background; ``mine`` is this member's progress."""
        assert self._thread is None, "one round at a time"
        self._result, self._error = None, None
        snapshot = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in weights.items()}
        self._thread = threading.Thread(
            target=self._round, args=(snapshot, mine), name=f"local-sgd-{self.assignment.id}", daemon=True
        )
        self._thread.start()

    def poll(self) -> dict[str, torch.Tensor] | None:
        """The round's average once it is in (``None`` before); raises what made the round impossible."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread = None
        if self._error is not None:
            raise self._error
        return self._result

    def close(self) -> None:
        self._group = None

    # -- the round, in its thread ------------------------------------------------------------------------
    def _round(self, weights: dict[str, torch.Tensor], mine: Contribution) -> None:
        try:
            self._result = self._average(weights, mine)
        except BaseException as exc:  # handed to the scheduler by ``poll``
            self._error = exc

    def _average(self, weights: dict[str, torch.Tensor], mine: Contribution) -> dict[str, torch.Tensor]:
        names = list(weights)
        flat = torch.cat([weights[name].reshape(-1) for name in names])
        size = len(self.assignment.members)
        me = self.assignment.rank
        while True:
            if not self._formed:
                self._form()
            # Progress rides along: each member writes its own slots, so the sum is everyone's.
            progress = torch.zeros(3 * size, dtype=torch.float32)
            progress[3 * me : 3 * me + 3] = torch.tensor(
                [mine.steps, mine.tokens_trained, mine.examples], dtype=torch.float32
            )
            buffer = torch.cat([flat, progress])
            if self._group is not None:
                try:
                    self._group.allreduce([buffer]).wait()
                except RuntimeError as exc:  # a member died (its sockets closed) or never answered
                    logger.warning("group %s lost a member (%s); forming it again", self.assignment.id, exc)
                    self._group, self._formed = None, False
                    self.status.generation += 1
                    continue
            break
        self.status.averages += 1
        for rank in self._members:
            steps, tokens, examples = buffer[flat.numel() + 3 * rank : flat.numel() + 3 * rank + 3].tolist()
            url = self.assignment.members[rank]
            self.status.contributions[url] = Contribution(
                steps=int(steps), tokens_trained=int(tokens), examples=int(examples)
            )
        for rank, url in enumerate(self.assignment.members):
            self.status.contributions[url].alive = rank in self._members
        averaged = buffer[: flat.numel()] / len(self._members)
        out, offset = {}, 0
        for name in names:
            count = weights[name].numel()
            out[name] = averaged[offset : offset + count].view_as(weights[name])
            offset += count
        return out

    def _form(self) -> None:
        """Form the current generation on the store of its first member that answers."""
        generation, me = self.status.generation, self.assignment.rank
        store, hosting = self._own_store, True
        for rank in self._members:
            if rank == me:
                break
            host, port = self.assignment.stores[rank].rsplit(":", 1)
            try:
                store = dist.TCPStore(
                    host, int(port), is_master=False, timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S)
                )
                hosting = False
                break
            except (RuntimeError, OSError):  # gone: the next member hosts
                continue
        prefix = f"{self.assignment.id}/g{generation}/"
        window = START_WINDOW_S if generation == 0 else REFORM_WINDOW_S
        store.set(f"{prefix}join/{me}", "1")
        if hosting:
            deadline = time.monotonic() + window
            while True:
                joined = [r for r in self._members if store.check([f"{prefix}join/{r}"])]
                if len(joined) == len(self._members) or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            store.set(f"{prefix}members", ",".join(map(str, joined)))
        else:
            store.wait([f"{prefix}members"], datetime.timedelta(seconds=window + 60))
        members = [int(r) for r in store.get(f"{prefix}members").decode().split(",")]
        if me not in members:
            raise LeftBehind(f"the group formed generation {generation} without this instance")
        self._members = members
        self._formed = True
        if len(members) == 1:
            self._group = None
            logger.info("group %s: this instance trains on alone", self.assignment.id)
            return
        self._group = dist.ProcessGroupGloo(
            dist.PrefixStore(f"{prefix}pg", store),
            members.index(me),
            len(members),
            datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        logger.info("group %s generation %d: members %s", self.assignment.id, generation, members)
