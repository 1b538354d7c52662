"""The fleet's jobs: one submission placed by slack, and every job seen and cancelled from any instance.

``POST /harli/jobs`` on any instance of a fleet (``--harli-peers``) checks and tokenizes the job where it
arrives, as without a fleet, and then ``FleetJobs.submit`` places it: on the instance named by the
spec's ``placement``, or on the one with the most to give a new job now (``core.fleet.placement.place`` over
every live instance's ``FleetCapacity``, this one's included). A job placed on a peer travels there already
tokenized (``POST /harli/fleet/jobs``, msgpack ``SubmitJob``), so its dataset never has to exist there.
With ``training.instances: N`` the job goes to the N best instances at once, each with its shard and
its place in the group (``core.fleet.local_sgd``); if one refuses it, the members already given it cancel it.

``GET /harli/jobs`` and ``/harli/jobs/{name}`` show the jobs of every live instance, each entry with the
``instance`` it runs on; ``POST /harli/jobs/{name}/cancel`` cancels it wherever it runs (on every member
of a group). A name is refused if any live instance has a job of that name (as one instance refuses
it). Two submissions of one name that race on two instances may both be taken; each instance still
holds only one.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from sglang_harli.core.errors import Conflict, SpecError, Unavailable
from sglang_harli.core.fleet.group import GroupAssignment, shard
from sglang_harli.core.fleet.peers import host_of, parse_peers
from sglang_harli.core.fleet.placement import FleetCapacity, place
from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.training.trainer import plan_steps
from sglang_harli.core.wire.control import CancelJob, ControlRequest, GetCapacity, GetJob, ListJobs, SubmitJob
from sglang_harli.srt.fleet.peers import PEER_TIMEOUT_S, TRANSFER_TIMEOUT_S, Fleet

Local = Callable[[ControlRequest], Awaitable[tuple[int, bytes]]]
"""This instance's scheduler: a control request's status and JSON payload."""
SUBMIT_TYPE = "application/msgpack"


class FleetJobs:
    def __init__(self, fleet: Fleet, local: Local):
        self.fleet, self.url = fleet, fleet.url
        self._local = local

    # -- submission ----------------------------------------------------------------------------------
    async def submit(self, submit: SubmitJob, here: Local) -> tuple[int, bytes]:
        """Place ``submit`` (checked and tokenized here) and hand it to its instance(s); ``here`` queues
        it on this one. The reply is the job's status there (the first member's, for a group)."""
        spec = submit.spec
        for job in await self.find(spec.name):
            if not (job.state in ("failed", "cancelled") and not job.published):
                where = f"on {job.instance} ({job.state})"
                raise Conflict("name", f"a job named {spec.name!r} already exists {where}")
        capacities = await self.capacities()
        wanted = spec.training.instances
        chosen = place(capacities, wanted)
        if spec.placement is not None:
            try:
                named = parse_peers(spec.placement)
            except ValueError as exc:
                raise SpecError("placement", str(exc)) from None
            if len(named) != 1 or named[0] not in capacities or not capacities[named[0]].finetunes:
                able = [url for url, capacity in capacities.items() if capacity.finetunes]
                raise Unavailable(
                    "placement",
                    f"{spec.placement!r} is not a live instance of this fleet that can finetune: {able} are",
                )
            chosen = [named[0], *[url for url in place(capacities, wanted) if url != named[0]]][:wanted]
        if len(chosen) < wanted:
            raise Unavailable(
                "training.instances",
                f"{wanted} instances asked for, {len(chosen)} of this fleet are alive and able to finetune",
            )
        if wanted == 1:
            return await self._hand(chosen[0], submit, here)
        return await self._submit_group(submit, chosen, capacities, here)

    async def _submit_group(
        self, submit: SubmitJob, chosen: list[str], capacities: dict[str, FleetCapacity], here: Local
    ) -> tuple[int, bytes]:
        spec, count = submit.spec, len(chosen)
        shards = [shard(submit.examples, rank, count) for rank in range(count)]
        if not shards[-1]:
            examples = len(submit.examples)
            raise SpecError("training.instances", f"{examples} examples cannot be shared by {count}")
        steps = min(plan_steps(len(part), spec.training) for part in shards)
        stores = [f"{host_of(url)}:{capacities[url].store_port}" for url in chosen]
        group = f"{spec.name}-{secrets.token_hex(4)}"
        first: tuple[int, bytes] | None = None
        for rank, (url, part) in enumerate(zip(chosen, shards, strict=True)):
            training = msgspec.structs.replace(spec.training, max_steps=steps)
            member = msgspec.structs.replace(
                submit,
                spec=msgspec.structs.replace(spec, training=training, placement=url),
                count=len(part),
                examples=part,
                group=GroupAssignment(
                    id=group, members=chosen, stores=stores, rank=rank,
                    average_every=spec.training.average_every, steps=steps,
                ),
            )  # fmt: skip
            status, body = await self._hand(url, member, here)
            if status >= 300:  # the members already given it let go of it
                for given in chosen[:rank]:
                    await self._cancel_on(given, spec.name)
                return status, body
            first = first or (status, body)
        return first

    async def _hand(self, url: str, submit: SubmitJob, here: Local) -> tuple[int, bytes]:
        if url == self.url:
            status, body = await here(submit)
        else:
            body = msgspec.msgpack.encode(submit)
            route, timeout = "/harli/fleet/jobs", TRANSFER_TIMEOUT_S
            status, body = await self._peer("POST", url, route, data=body, timeout=timeout)
        return status, self._with_instance(body, url) if status < 300 else body

    # -- seeing and cancelling -----------------------------------------------------------------------
    async def list(self) -> list[JobStatus]:
        """Every job of every live instance, each with the instance it runs on; this instance's first."""
        lists = await asyncio.gather(self._local_jobs(), *(self._peer_jobs(url) for url in self.fleet.live()))
        return [job for jobs in lists for job in jobs]

    async def find(self, name: str) -> list[JobStatus]:
        """The jobs named ``name`` across the fleet (one per member, for a group)."""
        return [job for job in await self.list() if job.name == name]

    async def cancel(self, name: str) -> tuple[int, bytes]:
        """Cancel ``name`` wherever it is queued or running: the first refusal or cancellation's reply."""
        found = await self.find(name)
        active = [job for job in found if job.state not in ("completed", "failed", "cancelled")]
        if not active:
            if not found:
                return await self._local(CancelJob(name=name))  # the local refusal names the job
            return await self._cancel_on(found[0].instance, name)  # its refusal: already finished
        replies = [await self._cancel_on(job.instance, name) for job in active]
        return next((reply for reply in replies if reply[0] < 300), replies[0])

    async def get(self, name: str) -> tuple[int, bytes]:
        found = await self.find(name)
        if not found:
            return await self._local(GetJob(name=name))  # the local refusal names the job
        here = [job for job in found if job.instance == self.url]
        return 200, msgspec.json.encode((here or found)[0])

    async def capacities(self) -> dict[str, FleetCapacity]:
        """What every live instance (this one first) has to give a new job now."""

        async def peer(url: str) -> FleetCapacity | None:
            status, body = await self._peer("GET", url, "/harli/fleet/capacity")
            return msgspec.json.decode(body, type=FleetCapacity) if status == 200 else None

        status, body = await self._local(GetCapacity())
        capacities = {self.url: msgspec.json.decode(body, type=FleetCapacity)} if status == 200 else {}
        urls = self.fleet.live()
        for url, capacity in zip(urls, await asyncio.gather(*(peer(url) for url in urls)), strict=True):
            if capacity is not None:
                capacities[url] = capacity
        return capacities

    # -- plumbing ------------------------------------------------------------------------------------
    async def _cancel_on(self, url: str, name: str) -> tuple[int, bytes]:
        if url == self.url:
            return await self._local(CancelJob(name=name))
        return await self._peer("POST", url, f"/harli/fleet/jobs/{name}/cancel")

    async def _local_jobs(self) -> list[JobStatus]:
        status, body = await self._local(ListJobs())
        jobs = msgspec.json.decode(body, type=list[JobStatus]) if status == 200 else []
        for job in jobs:
            job.instance = self.url
        return jobs

    async def _peer_jobs(self, url: str) -> list[JobStatus]:
        status, body = await self._peer("GET", url, "/harli/fleet/jobs")
        jobs = msgspec.json.decode(body, type=list[JobStatus]) if status == 200 else []
        for job in jobs:
            job.instance = url
        return jobs

    async def _peer(self, method: str, url: str, route: str, *, data: bytes | None = None,
                    timeout: float = PEER_TIMEOUT_S * 5) -> tuple[int, bytes]:  # fmt: skip
        """A call to a peer's route with the admin key: its status and body (503 if it did not answer)."""
        headers = {**self.fleet.headers, **({"Content-Type": SUBMIT_TYPE} if data is not None else {})}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.request(method, f"{url}{route}", data=data, headers=headers) as resp:
                    return resp.status, await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = Unavailable("placement", f"instance {url} did not answer: {type(exc).__name__}: {exc}")
            return error.status, msgspec.json.encode(error.body())

    def _with_instance(self, body: bytes, url: str) -> bytes:
        job = msgspec.json.decode(body, type=JobStatus)
        job.instance = url
        return msgspec.json.encode(job)
