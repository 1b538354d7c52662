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
import itertools
import logging

import msgspec
from fastapi import APIRouter, Request, Response
from sglang.srt.entrypoints import http_server
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.control import TinkerCreateModel, TinkerForwardBackward, TinkerOptimStep
from sglang_harli.core.errors import HarliError, NotFound, SpecError
from sglang_harli.core.jobs import PEFT_TARGET_MODULES, LoraSpec
from sglang_harli.core.tinker_codec import decode_forward_backward, decompress
from sglang_harli.core.tinker_futures import FutureTable, ModelSequence, Outcome
from sglang_harli.core.tinker_trainer import AdamParams
from sglang_harli.srt.control import HarliTinkerResult, control_client

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["tinker"])

LORA_ALPHA = 32.0
"""The LoRA alpha of a Tinker training client (the API sets only the rank)."""
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class _State:
    """The API's state in this process: sessions, models and their sequences, futures."""

    def __init__(self, tokenizer_manager):
        self.tokenizer_manager = tokenizer_manager
        self.futures = FutureTable()
        self.sessions = itertools.count(1)
        self.models: dict[str, ModelSequence] = {}
        self.ranks: dict[str, int] = {}
        self.created: dict[str, str] = {}  # model_id -> the request id of its create_model
        self._results: dict[str, asyncio.Future[Outcome]] = {}
        self._tasks: set[asyncio.Task] = set()
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(HarliTinkerResult, self._arrived)])

    def model(self, model_id: str) -> ModelSequence:
        """The model's operation sequence; ``NotFound`` naming ``model_id``."""
        model = self.models.get(model_id)
        if model is None:
            raise NotFound("model_id", f"no training client {model_id!r}")
        return model

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
    return _json({"session_id": f"sess-{next(_state().sessions)}", "type": "create_session"})


@router.post("/session_heartbeat")
async def session_heartbeat() -> Response:
    return _json({"type": "session_heartbeat"})


@router.post("/telemetry")
async def telemetry() -> Response:
    return _json({"status": "accepted"})


@router.get("/healthz")
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get("/get_server_capabilities")
async def server_capabilities() -> Response:
    manager = _state().tokenizer_manager
    name = manager.server_args.served_model_name or manager.server_args.model_path
    context = getattr(manager, "context_len", None)
    model = {"model_name": name, "max_context_length": context, "trainable": True, "sampleable": True}
    return _json({"supported_models": [model]})


# -- training clients ------------------------------------------------------------------------------------
@router.post("/create_model")
async def create_model(request: Request) -> Response:
    state = _state()
    try:
        body = await _body(request)
        session = _field(body, "session_id", str)
        sequence = _field(body, "model_seq_id", int)
        config = body.get("lora_config") or {}
        rank = config.get("rank", 32)
        if not isinstance(rank, int) or rank < 1:
            raise SpecError("lora_config.rank", "must be a positive integer")
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
    if model_id in state.created:  # a resent submission
        return _json({"request_id": state.created[model_id], "model_id": model_id})
    request_id = state.futures.create()
    state.created[model_id] = request_id
    lora = LoraSpec(r=rank, alpha=LORA_ALPHA, target_modules=[m for m in PEFT_TARGET_MODULES if m in modules])

    async def create() -> None:
        refused = await state.call(TinkerCreateModel(model_id=model_id, lora=lora, seed=int(seed)))
        if refused is None:
            state.models[model_id] = ModelSequence(state.futures)
            state.ranks[model_id] = rank
        state.futures.resolve(
            request_id,
            refused or Outcome(body=msgspec.json.encode({"model_id": model_id, "type": "create_model"})),
        )

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
    path = state.tokenizer_manager.server_args.model_path
    return _json({
        "type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": state.ranks[model_id],
        "model_name": path, "model_data": {"model_name": path, "tokenizer_id": path},
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
