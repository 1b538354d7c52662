"""The Tinker API's futures and per-model ordering (``core.tinker.futures``): a model's operations run
in seq_id order whatever order they arrive in, a resent submission gets its first request id and runs
once, a poll is held until the result or the poll window, and an operation's failure is its own."""

import asyncio

import pytest

from sglang_harli.core.tinker.futures import FutureTable, ModelSequence, Outcome


def run(coroutine):
    return asyncio.run(coroutine)


def test_operations_run_in_seq_order_once_each_whatever_order_they_arrive_in():
    async def main():
        futures = FutureTable()
        model = ModelSequence(futures)
        ran = []

        def op(name):
            async def go(request_id):
                ran.append(name)
                await asyncio.sleep(0)
                return Outcome(body=name.encode())

            return go

        third = model.submit(3, op("optim"))
        second = model.submit(2, op("chunk-b"))
        await asyncio.sleep(0.01)
        assert ran == []  # seq 1 has not arrived: nothing may run ahead of it
        first = model.submit(1, op("chunk-a"))
        assert model.submit(1, op("chunk-a again")) == first  # a resend: the same future, not run twice
        results = [await futures.wait(rid, timeout_s=5) for rid in (first, second, third)]
        assert ran == ["chunk-a", "chunk-b", "optim"]
        assert [r.body for r in results] == [b"chunk-a", b"chunk-b", b"optim"]
        late = model.submit(2, op("late"))  # remembered: still the original
        assert late == second
        assert model.next_seq_id == 4

    run(main())


def test_a_poll_is_held_until_the_result_or_the_window():
    async def main():
        futures = FutureTable()
        model = ModelSequence(futures)
        gate = asyncio.Event()

        async def slow(request_id):
            await gate.wait()
            return Outcome(body=b"{}")

        request_id = model.submit(1, slow)
        assert await futures.wait(request_id, timeout_s=0.05) is None  # try_again
        asyncio.get_running_loop().call_later(0.05, gate.set)
        outcome = await futures.wait(request_id, timeout_s=5)
        assert outcome.payload() == (b"{}", "application/json")
        with pytest.raises(KeyError):
            await futures.wait("req-unknown", timeout_s=0.01)

    run(main())


def test_a_failing_operation_fails_its_own_future_and_the_next_one_still_runs():
    async def main():
        futures = FutureTable()
        model = ModelSequence(futures)

        async def broken(request_id):
            raise ValueError("bad datum")

        async def fine(request_id):
            return Outcome(body=b"ok")

        bad, good = model.submit(1, broken), model.submit(2, fine)
        failed = await futures.wait(bad, timeout_s=5)
        body, media = failed.payload()
        assert media == "application/json" and b'"category":"server"' in body and b"bad datum" in body
        assert (await futures.wait(good, timeout_s=5)).body == b"ok"

    run(main())


def test_finished_futures_are_kept_up_to_a_bound():
    async def main():
        futures = FutureTable(keep=2)
        ids = [futures.create() for _ in range(3)]
        for rid in ids:
            futures.resolve(rid, Outcome(body=b"x"))
        assert not futures.known(ids[0]) and futures.known(ids[2])

    run(main())
