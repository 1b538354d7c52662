"""Local SGD between members of a job trained on several instances (``core.fleet.local_sgd``): the average is
exact and carries everyone's progress, and a member that dies leaves the others averaging on without it.
The members are real gloo groups over real TCP stores: threads of this process, and a child process that
is killed."""

import subprocess
import sys
import time

import pytest
import torch

from sglang_harli.core.fleet import local_sgd
from sglang_harli.core.fleet.group import Contribution, GroupAssignment, GroupStatus, shard
from sglang_harli.core.fleet.local_sgd import LocalSgd, host_store

MEMBERS = ["http://a:1", "http://b:2", "http://c:3"]


def _members(count: int, stores, *, every: int = 2, steps: int = 6) -> list[LocalSgd]:
    addresses = [f"127.0.0.1:{store.port}" for store in stores]
    return [
        LocalSgd(
            GroupStatus(
                assignment=GroupAssignment(
                    id="job-1",
                    members=MEMBERS[:count],
                    stores=addresses,
                    rank=rank,
                    average_every=every,
                    steps=steps,
                )
            ),
            stores[rank],
        )  # fmt: skip
        for rank in range(count)
    ]


def _wait(member: LocalSgd, timeout_s: float = 60.0):
    """The member's average, as the scheduler polls for it; raises what the round raised."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = member.poll()
        if out is not None:
            return out
        time.sleep(0.05)
    raise AssertionError("no average")


def test_shards_cover_the_examples_once():
    items = list(range(10))
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == items
    assert parts[1] == [1, 4, 7]


def test_members_average_their_weights_and_share_their_progress():
    stores = [host_store(), host_store()]
    a, b = _members(2, stores)
    assert a.due(2) and a.due(6) and not a.due(3)
    a.start(
        {"w": torch.tensor([1.0, 2.0]), "v": torch.ones(2, 2)},
        Contribution(steps=2, tokens_trained=10, examples=5),
    )
    b.start(
        {"w": torch.tensor([3.0, 5.0]), "v": torch.zeros(2, 2)},
        Contribution(steps=2, tokens_trained=30, examples=4),
    )
    out_a, out_b = _wait(a), _wait(b)
    assert torch.equal(out_a["w"], torch.tensor([2.0, 3.5])) and torch.equal(
        out_a["v"], torch.full((2, 2), 0.5)
    )
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)  # bit for bit on every member
    progress = a.status.contributions
    assert progress[MEMBERS[0]].tokens_trained == 10 and progress[MEMBERS[1]].tokens_trained == 30
    assert progress[MEMBERS[1]].examples == 4 and a.status.averages == 1


CHILD = """
import os, sys, torch
from sglang_harli.core.fleet.group import Contribution, GroupAssignment, GroupStatus
from sglang_harli.core.fleet.local_sgd import LocalSgd, host_store
store = host_store()
print(store.port, flush=True)
stores = sys.stdin.readline().split()
assignment = GroupAssignment(
    id="job-1", members=["http://a:1", "http://b:2"], stores=stores, rank=1, average_every=2, steps=6)
member = LocalSgd(GroupStatus(assignment=assignment), store)
member.start({"w": torch.tensor([3.0])}, Contribution(steps=2, tokens_trained=7, examples=1))
while (out := member.poll()) is None:
    pass
print("averaged", out["w"].item(), flush=True)
os._exit(0)  # dies before the next average, without a word to the group
"""


def test_a_member_that_dies_leaves_the_others_averaging_on(monkeypatch):
    monkeypatch.setattr(local_sgd, "REFORM_WINDOW_S", 1.0)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    try:
        child_port = int(child.stdout.readline())
        store = host_store()
        stores = [f"127.0.0.1:{store.port}", f"127.0.0.1:{child_port}"]
        child.stdin.write(" ".join(stores) + "\n")
        child.stdin.flush()
        member = LocalSgd(
            GroupStatus(
                assignment=GroupAssignment(
                    id="job-1", members=MEMBERS[:2], stores=stores, rank=0, average_every=2, steps=6
                )
            ),
            store,
        )
        member.start({"w": torch.tensor([1.0])}, Contribution(steps=2, tokens_trained=5, examples=1))
        assert _wait(member)["w"].item() == 2.0
        assert child.stdout.readline().split() == ["averaged", "2.0"]
        child.wait(timeout=30)
        member.start({"w": torch.tensor([4.0])}, Contribution(steps=4, tokens_trained=9, examples=1))
        assert _wait(member)["w"].item() == 4.0  # alone now: its own weights
        assert member.status.generation == 1
        assert not member.status.contributions[MEMBERS[1]].alive
        assert member.status.contributions[MEMBERS[1]].tokens_trained == 7  # as of its last average
    finally:
        child.kill()


def test_a_member_left_out_of_a_generation_is_told(monkeypatch):
    monkeypatch.setattr(local_sgd, "START_WINDOW_S", 0.5)
    stores = [host_store(), host_store()]
    a, b = _members(2, stores)
    a.start({"w": torch.tensor([1.0])}, Contribution(steps=2))
    assert _wait(a)["w"].item() == 1.0  # the first generation formed without b
    b.start({"w": torch.tensor([3.0])}, Contribution(steps=2))
    with pytest.raises(local_sgd.LeftBehind):
        _wait(b)
