"""The Tinker API (``/api/v1``), the HTTP side: what the official ``tinker`` SDK calls, on the served model.

The SDK (pinned, ``tinker==0.38.0``) starts with ``client/config``, ``client/dynamic_config`` and
``create_session``, then beats ``session_heartbeat`` and sends ``telemetry`` every 10 s. Every operation
that does work answers at once with a ``request_id`` (and the ``model_id``); the SDK polls
``retrieve_future``, which is held up to ``core.tinker_futures.POLL_S`` and answers ``try_again`` until
the outcome is in: JSON, or protobuf for ``forward_backward`` (``core.tinker_codec``). A model's
operations run in ``seq_id`` order and once each (``ModelSequence``); each goes to the scheduler as a
control request (``srt.tinker_models``), whose outcome comes back unsolicited as a ``HarliTinkerResult``.

Errors in the protocol's shape: a request that cannot be read is refused at submission (HTTP 4xx with
``{"error", "field"}``), an operation that fails resolves its future with ``{"error", "category"}``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from pathlib import Path

import msgspec
from fastapi import APIRouter, Request, Response
from sglang.srt.entrypoints import http_server
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.control import (
    TinkerCreateModel,
    TinkerDropModel,
    TinkerForwardBackward,
    TinkerLoad,
    TinkerOptimStep,
    TinkerSave,
)
from sglang_harli.core.errors import HarliError, NotAvailable, NotFound, SpecError
from sglang_harli.core.jobs import PEFT_TARGET_MODULES, LoraSpec
from sglang_harli.core.tinker_codec import decode_forward_backward, decompress
from sglang_harli.core.tinker_futures import FutureTable, ModelSequence, Outcome
from sglang_harli.core.tinker_sessions import SESSION_TIMEOUT_S, Sessions, sampling_session_id, session_of
from sglang_harli.core.tinker_store import TinkerPath, TinkerStore
from sglang_harli.core.tinker_trainer import AdamParams
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt import tinker_auth
from sglang_harli.srt.control import HarliTinkerResult, control_client
from sglang_harli.srt.tinker_models import MAX_MODELS
from sglang_harli.srt.tinker_sampling import SampleRequest, SamplingSession, Snapshots, generate

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["tinker"])

LORA_ALPHA = 32.0
"""The LoRA alpha of a Tinker training client (the API sets only the rank)."""
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
KEEP_SAMPLE_IDS = 4096
"""Sample submissions remembered for deduplication (the SDK resends the same seq_id on a lost answer)."""


def store_root(config: HarliConfig) -> Path:
    """Where saved weights live: under --harli-state-dir (durable), else beside the adapters."""
    if config.state_dir:
        return Path(config.state_dir) / "tinker"
    return Path(config.output_dir or cache_root() / "adapters") / "tinker"


class _State:
    """The API's state in this process: sessions, models and their sequences, futures."""

    def __init__(self, tokenizer_manager):
        self.tokenizer_manager = tokenizer_manager
        self.futures = FutureTable()
        self.models: dict[str, ModelSequence] = {}
        self.ranks: dict[str, int] = {}
        self.sessions = Sessions(MAX_MODELS)
        self._reaper: asyncio.Task | None = None
        args = tokenizer_manager.server_args
        self.store = TinkerStore(store_root(getattr(args, "_harli_config", None) or HarliConfig()))
        self.served_names = {n for n in (args.served_model_name, args.model_path) if n}
        if (args.served_model_name or "").startswith("harli-"):  # a preset is served as harli-tiny
            self.served_names.add(args.served_model_name.replace("-", ":", 1))  # and named harli:tiny
        self.store.forget_unnamed()  # their sessions died with the last process
        self.snapshots = Snapshots(tokenizer_manager)
        self.sampling: dict[str, SamplingSession] = {}
        self.samples: OrderedDict[tuple[str, int], dict] = OrderedDict()  # dedup of asample
        self._results: dict[str, asyncio.Future[Outcome]] = {}
        self._tasks: set[asyncio.Task] = set()
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(HarliTinkerResult, self._arrived)])

    def model(self, model_id: str) -> ModelSequence:
        """The model's operation sequence; ``NotFound`` naming ``model_id``."""
        model = self.models.get(model_id)
        if model is None:
            raise NotFound("model_id", f"no training client {model_id!r}")
        return model

    def beat(self, session: str) -> None:
        self.sessions.beat(session)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    def reserve(self, model_id: str) -> str:
        """A new training client's place (``Sessions.reserve``) and the request id of its creation."""
        request_id = self.sessions.reserve(model_id, self.futures.create)
        self.beat(session_of(model_id))
        return request_id

    async def end_session(self, session: str) -> None:
        """Drop the session's training clients (freeing their places and memory) and sampling sessions."""
        for model_id in self.sessions.end(session):
            self.models.pop(model_id, None)
            self.ranks.pop(model_id, None)
            await self.call(TinkerDropModel(model_id=model_id))
        for sampler in [s for s in self.sampling if session_of(s) == session]:
            del self.sampling[sampler]

    async def _reap(self) -> None:
        while self.sessions.any_alive:
            await asyncio.sleep(SESSION_TIMEOUT_S / 4)
            for session in self.sessions.expired():
                logger.info("tinker session %s ended: no heartbeat for %.0f s", session, SESSION_TIMEOUT_S)
                await self.end_session(session)

    def check_base_model(self, value: object, field: str = "base_model") -> None:
        """A client naming a model must name the one this server serves (its path or served name)."""
        if value is not None and value not in self.served_names:
            raise SpecError(
                field, f"{value!r} is not served here; this server serves {sorted(self.served_names)}"
            )

    @property
    def base_model(self) -> str:
        args = self.tokenizer_manager.server_args
        return args.served_model_name or args.model_path

    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arrived(self, message: HarliTinkerResult) -> None:
        waiter = self._results.pop(message.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.outcome)

    async def queued(self, request_id: str, control) -> Outcome:
        """Send a training operation to the scheduler and wait for its outcome (``HarliTinkerResult``)."""
        waiter = asyncio.get_running_loop().create_future()
        self._results[request_id] = waiter
        refused = await self.call(control)
        if refused is not None:
            self._results.pop(request_id, None)
            return refused
        return await waiter

    async def call(self, control) -> Outcome | None:
        """A control request; ``None`` when the scheduler took it, else the refusal as an outcome."""
        self.tokenizer_manager.auto_create_handle_loop()
        reply = (await control_client(self.tokenizer_manager).call(control))[0]
        if reply.status < 300:
            return None
        error = msgspec.json.decode(reply.payload)
        category = "user" if reply.status < 500 else "server"
        return Outcome(error=error.get("error", str(error)), category=category)


def _state() -> _State:
    tokenizer_manager = http_server.get_global_state().tokenizer_manager
    state = getattr(tokenizer_manager, "_harli_tinker", None)
    if state is None:
        state = tokenizer_manager._harli_tinker = _State(tokenizer_manager)
    return state


def _json(body, status: int = 200) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


async def _body(request: Request) -> dict:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise SpecError("body", f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SpecError("body", "must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SpecError(name, f"must be {kind.__name__}")
    return value


def _check_servable(state: _State, rank: int) -> None:
    """A training client's snapshots are sampled as SGLang adapters: its rank must fit the server's."""
    args = state.tokenizer_manager.server_args
    if not args.enable_lora:
        raise NotAvailable("lora_config", "training clients need a server started with --enable-lora")
    if args.max_lora_rank is not None and rank > args.max_lora_rank:
        raise SpecError(
            "lora_config.rank", f"rank {rank} is above the server's --max-lora-rank {args.max_lora_rank}"
        )


def _refused(exc: HarliError) -> Response:
    return _json(exc.body(), status=exc.status)


# -- start-up, sessions ----------------------------------------------------------------------------------
@router.post("/client/config")
async def client_config() -> Response:
    return _json({})


@router.post("/client/dynamic_config")
async def dynamic_config() -> Response:
    return _json({})


@router.post("/create_session")
async def create_session() -> Response:
    # Random, not counted: model ids and saved paths (``tinker://<session>:train:<n>/...``) must not repeat
    # after a restart, when a resumed loop's new session saves beside the old one's checkpoints.
    return _json({"session_id": f"sess-{secrets.token_hex(6)}", "type": "create_session"})


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request) -> Response:
    try:
        session = _field(await _body(request), "session_id", str)
    except HarliError as exc:
        return _refused(exc)
    _state().beat(session)  # one this process never made (it restarted) is simply taken up
    return _json({"type": "session_heartbeat"})


@router.post("/telemetry")
async def telemetry() -> Response:
    return _json({"status": "accepted"})


@router.get("/healthz")
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get("/get_server_capabilities")
async def server_capabilities() -> Response:
    state = _state()
    context = getattr(state.tokenizer_manager, "context_len", None)
    model = {
        "model_name": state.base_model,
        "max_context_length": context,
        "trainable": True,
        "sampleable": True,
    }
    return _json({"supported_models": [model]})


# -- training clients ------------------------------------------------------------------------------------
@router.post("/create_model")
async def create_model(request: Request) -> Response:
    state = _state()
    try:
        body = await _body(request)
        session = _field(body, "session_id", str)
        sequence = _field(body, "model_seq_id", int)
        state.check_base_model(body.get("base_model"))
        config = body.get("lora_config") or {}
        rank = config.get("rank", 32)
        if not isinstance(rank, int) or rank < 1:
            raise SpecError("lora_config.rank", "must be a positive integer")
        _check_servable(state, rank)
        modules = [
            *(ATTENTION if config.get("train_attn", True) else ()),
            *(MLP if config.get("train_mlp", True) else ()),
        ]
        if not modules:
            raise SpecError(
                "lora_config", "train_attn or train_mlp must be true (the unembedding is not trained)"
            )
        seed = config.get("seed") or 0
    except HarliError as exc:
        return _refused(exc)
    model_id = f"{session}:train:{sequence}"
    lora = LoraSpec(r=rank, alpha=LORA_ALPHA, target_modules=[m for m in PEFT_TARGET_MODULES if m in modules])
    control = TinkerCreateModel(model_id=model_id, lora=lora, seed=int(seed))
    return _create(state, model_id, rank, control, {"model_id": model_id, "type": "create_model"})


def _create(state: _State, model_id: str, rank: int, control, answer: dict) -> Response:
    """A new training client (``create_model``, or ``load_weights`` creating one): its place held, the
    scheduler asked to make it, the answer once it is made; a resent submission gets the first's future."""
    if (request_id := state.sessions.creating(model_id)) is not None:
        return _json({"request_id": request_id, "model_id": model_id})
    try:
        request_id = state.reserve(model_id)
    except HarliError as exc:
        return _refused(exc)

    async def create() -> None:
        outcome = await _on_scheduler(state, control, answer)
        if outcome.error is None:
            state.models[model_id] = ModelSequence(state.futures)
            state.ranks[model_id] = rank
        else:  # its place is free again
            state.sessions.release(model_id)
        state.futures.resolve(request_id, outcome)

    state.spawn(create())
    return _json({"request_id": request_id, "model_id": model_id})


@router.post("/get_info")
async def get_info(request: Request) -> Response:
    state = _state()
    try:
        model_id = _field(await _body(request), "model_id", str)
        state.model(model_id)
    except HarliError as exc:
        return _refused(exc)
    name = state.base_model
    return _json({
        "type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": state.ranks[model_id],
        "model_name": name, "model_data": {"model_name": name, "tokenizer_id": name},
    })  # fmt: skip


@router.post("/forward_backward")
async def forward_backward(request: Request) -> Response:
    state = _state()
    try:
        body = await request.body()
        if request.headers.get("content-encoding") == "zstd":
            body = decompress(body)
        decoded = decode_forward_backward(body)  # refused here, naming the datum, before anything runs
        model = state.model(decoded.model_id)
    except HarliError as exc:
        return _refused(exc)

    async def run(request_id: str) -> Outcome:
        control = TinkerForwardBackward(model_id=decoded.model_id, request_id=request_id, body=body)
        return await state.queued(request_id, control)

    request_id = model.submit(decoded.seq_id, run)
    return _json({"request_id": request_id, "model_id": decoded.model_id})


@router.post("/optim_step")
async def optim_step(request: Request) -> Response:
    state = _state()
    try:
        body = await _body(request)
        model_id = _field(body, "model_id", str)
        seq_id = _field(body, "seq_id", int)
        params = body.get("adam_params")
        if not isinstance(params, dict):
            raise SpecError("adam_params", "is required (only AdamW is served)")
        try:
            adam = msgspec.convert(params, AdamParams)
        except msgspec.ValidationError as exc:
            raise SpecError("adam_params", str(exc)) from None
        model = state.model(model_id)
    except HarliError as exc:
        return _refused(exc)

    async def run(request_id: str) -> Outcome:
        return await state.queued(
            request_id, TinkerOptimStep(model_id=model_id, request_id=request_id, adam=adam)
        )

    request_id = model.submit(seq_id, run)
    return _json({"request_id": request_id, "model_id": model_id})


@router.post("/retrieve_future")
async def retrieve_future(request: Request) -> Response:
    state = _state()
    try:
        request_id = _field(await _body(request), "request_id", str)
        outcome = await state.futures.wait(request_id)
    except HarliError as exc:
        return _refused(exc)
    except KeyError:
        return _refused(NotFound("request_id", "no such request (or it was forgotten)"))
    if outcome is None:
        return _json({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    content, media_type = outcome.payload()
    return Response(content=content, media_type=media_type)


# -- saved weights ---------------------------------------------------------------------------------------
async def _on_scheduler(state: _State, control, answer: dict) -> Outcome:
    """Send ``control`` and answer with ``answer`` once the scheduler took it (its refusal otherwise)."""
    return await state.call(control) or Outcome(body=msgspec.json.encode(answer))


@router.post("/save_weights")
async def save_weights(request: Request) -> Response:
    """``TrainingClient.save_state(name)``: the training state, durably, as ``tinker://<model>/weights/<name>``."""
    state = _state()
    try:
        body = await _body(request)
        model_id = _field(body, "model_id", str)
        seq_id = _field(body, "seq_id", int)
        model = state.model(model_id)
        path = TinkerPath.named(model_id, "weights", body.get("path"))
        overwrite = bool(body.get("overwrite", False))
    except HarliError as exc:
        return _refused(exc)
    directory = state.store.directory(path)

    async def run(request_id: str) -> Outcome:
        if directory.exists() and not overwrite:
            return Outcome(
                error=f"{path} exists (save under another name, or with overwrite)", category="user"
            )
        control = TinkerSave(model_id=model_id, kind="weights", directory=str(directory))
        return await _on_scheduler(state, control, {"path": str(path), "type": "save_weights"})

    return _json({"request_id": model.submit(seq_id, run), "model_id": model_id})


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request) -> Response:
    """Named: ``tinker://<model>/sampler_weights/<name>``, sampled through ``create_sampling_session``.
    Unnamed (``save_weights_and_get_sampling_client``): a sampling session of its own, loaded at once."""
    state = _state()
    try:
        body = await _body(request)
        model_id = _field(body, "model_id", str)
        seq_id = _field(body, "seq_id", int)
        model = state.model(model_id)
        if body.get("path") is not None:
            path = TinkerPath.named(model_id, "sampler_weights", body["path"])
            directory, session = state.store.directory(path), None
        else:
            number = _field(body, "sampling_session_seq_id", int)
            path, directory = None, state.store.unnamed(model_id, number)
            session_id = sampling_session_id(session_of(model_id), number)
            session = SamplingSession(session_id, state.base_model, directory=directory, unnamed=True)
    except HarliError as exc:
        return _refused(exc)

    async def run(request_id: str) -> Outcome:
        if path is not None and directory.exists():
            return Outcome(error=f"{path} exists (save the snapshot under another name)", category="user")
        refused = await state.call(
            TinkerSave(model_id=model_id, kind="sampler_weights", directory=str(directory))
        )
        if refused is not None:
            return refused
        if session is None:
            return Outcome(body=msgspec.json.encode({"path": str(path), "type": "save_weights_for_sampler"}))
        state.sampling[session.session_id] = session
        try:  # served before the client hears of it: its first sample does not wait for the load
            state.snapshots.release(await state.snapshots.acquire(session))
        except Exception as exc:
            return Outcome(error=f"the snapshot could not be served: {exc}", category="server")
        answer = {"sampling_session_id": session.session_id, "path": None, "type": "save_weights_for_sampler"}
        return Outcome(body=msgspec.json.encode(answer))

    return _json({"request_id": model.submit(seq_id, run), "model_id": model_id})


@router.post("/load_weights")
async def load_weights(request: Request) -> Response:
    """A saved training state: into an existing model (``model_id`` and ``seq_id``), or, with
    ``session_id`` and ``model_seq_id`` (``create_training_client_from_state``), as a new model."""
    state = _state()
    try:
        body = await _body(request)
        path = TinkerPath.parse(body.get("path"), "path")
        if path.kind != "weights":
            raise SpecError("path", "load_weights takes a weights/ path (from save_weights), not a snapshot")
        directory = state.store.existing(path, "path")
        optimizer = bool(body.get("optimizer", False))
        answer = {"path": str(path), "type": "load_weights"}
        if body.get("model_id") is not None:
            model_id = _field(body, "model_id", str)
            seq_id = _field(body, "seq_id", int)
            model = state.model(model_id)
        else:
            session = _field(body, "session_id", str)
            number = _field(body, "model_seq_id", int)
            state.check_base_model(body.get("base_model"))
            lora = TinkerStore.saved_lora(directory, "path")
            _check_servable(state, lora.r)
            model_id, model = f"{session}:train:{number}", None
    except HarliError as exc:
        return _refused(exc)
    answer["model_id"] = model_id
    control = TinkerLoad(
        model_id=model_id, directory=str(directory), optimizer=optimizer, create=model is None
    )
    if model is not None:

        async def run(request_id: str) -> Outcome:
            return await _on_scheduler(state, control, answer)

        return _json({"request_id": model.submit(seq_id, run), "model_id": model_id})
    return _create(state, model_id, lora.r, control, answer)


# -- sampling --------------------------------------------------------------------------------------------
@router.post("/create_sampling_session")
async def create_sampling_session(request: Request) -> Response:
    state = _state()
    try:
        body = await _body(request)
        session_id = _field(body, "session_id", str)
        number = _field(body, "sampling_session_seq_id", int)
        state.check_base_model(body.get("base_model"))
        sampler = sampling_session_id(session_id, number)
        if body.get("model_path") is not None:
            path = TinkerPath.parse(body["model_path"], "model_path")
            if path.kind != "sampler_weights":
                raise SpecError(
                    "model_path", "samples a sampler_weights/ path (from save_weights_for_sampler)"
                )
            directory = state.store.existing(path, "model_path")
            session = SamplingSession(sampler, state.base_model, model_path=str(path), directory=directory)
        elif body.get("base_model") is not None:
            session = SamplingSession(sampler, state.base_model)
        else:
            raise SpecError("model_path", "give model_path (a snapshot) or base_model")
    except HarliError as exc:
        return _refused(exc)
    state.sampling.setdefault(sampler, session)
    return _json({"sampling_session_id": sampler, "type": "create_sampling_session"})


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str) -> Response:
    session = _state().sampling.get(sampler_id)
    if session is None:
        return _refused(NotFound("sampler_id", f"no sampling session {sampler_id!r}"))
    return _json(
        {"sampler_id": sampler_id, "base_model": session.base_model, "model_path": session.model_path}
    )


@router.post("/asample")
async def asample(request: Request) -> Response:
    """``SamplingClient.sample`` / ``compute_logprobs``: ``num_samples`` generations through SGLang; the
    reply names each sample (``sample_sequence_ids``), the future resolves to a protobuf SampleResponse."""
    state = _state()
    try:
        body = await _body(request)
        sampler_id = _field(body, "sampling_session_id", str)
        seq_id = _field(body, "seq_id", int)
        session = state.sampling.get(sampler_id)
        if session is None:
            raise NotFound("sampling_session_id", f"no sampling session {sampler_id!r}")
        key = (sampler_id, seq_id)
        if key in state.samples:  # a resent submission
            return _json(state.samples[key])
        sample = SampleRequest.parse(body, getattr(state.tokenizer_manager, "context_len", None))
    except HarliError as exc:
        return _refused(exc)
    request_id = state.futures.create()
    reply = {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(sample.num_samples)],
    }
    state.samples[key] = reply
    while len(state.samples) > KEEP_SAMPLE_IDS:
        state.samples.popitem(last=False)

    async def run() -> None:
        adapter = None
        try:
            if session.directory is not None:
                adapter = await state.snapshots.acquire(session)
            body = await generate(state.tokenizer_manager, sample, adapter)
            outcome = Outcome(body=body, media_type="application/x-protobuf")
        except HarliError as exc:
            outcome = Outcome(error=str(exc), category="user")
        except ValueError as exc:  # SGLang's refusal of the request itself (a prompt past the context...)
            outcome = Outcome(error=f"{type(exc).__name__}: {exc}", category="user")
        except Exception as exc:
            logger.warning("tinker sample failed", exc_info=True)
            outcome = Outcome(error=f"{type(exc).__name__}: {exc}", category="server")
        finally:
            if adapter is not None:
                state.snapshots.release(adapter)
        state.futures.resolve(request_id, outcome)

    state.spawn(run())
    return _json(reply)


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str) -> Response:
    """``ServiceClient.close()``: the session's training clients and sampling sessions are dropped."""
    await _state().end_session(session_id)
    return _json({})


tinker_auth.mark_routes(router)
