"""The Tinker API's training routes: training clients, ``forward_backward`` / ``optim_step``, and saving
and loading their weights.

Every operation on a training client answers at once with a ``request_id`` (and the ``model_id``) and runs
in the client's ``seq_id`` order (``core.tinker.futures.ModelSequence``), as a control request to the
scheduler (``core.tinker.models``), whose outcome resolves the future the SDK polls (``srt.tinker.state``).
A request that cannot be read is refused here, before anything runs: HTTP 4xx with ``{"error", "field"}``.
"""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response

from sglang_harli.core.errors import SpecError
from sglang_harli.core.jobs.spec import PEFT_TARGET_MODULES, LoraSpec
from sglang_harli.core.tinker.codec import decode_forward_backward
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.tinker.sessions import sampling_session_id, session_of
from sglang_harli.core.tinker.store import TinkerPath, TinkerStore
from sglang_harli.core.wire.control import (
    TinkerCreateModel,
    TinkerForwardBackward,
    TinkerLoad,
    TinkerOptimStep,
    TinkerSave,
)
from sglang_harli.srt.body import decode, json_response, read_body
from sglang_harli.srt.service import harli
from sglang_harli.srt.tinker import auth
from sglang_harli.srt.tinker.bodies import (
    CreateModel,
    GetInfo,
    LoadWeights,
    LoraConfig,
    OptimStep,
    SaveWeights,
    SaveWeightsForSampler,
)
from sglang_harli.srt.tinker.snapshots import SamplingSession

router = APIRouter(prefix="/api/v1", tags=["tinker"])

LORA_ALPHA = 32.0
"""The LoRA alpha of a Tinker training client (the API sets only the rank)."""
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _submitted(request_id: str, model_id: str) -> Response:
    return json_response({"request_id": request_id, "model_id": model_id})


@router.post("/create_model")
async def create_model(request: Request) -> Response:
    """A LoRA training client over the served weights (``ServiceClient.create_lora_training_client``)."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), CreateModel)
    state.check_base_model(body.base_model)
    config = body.lora_config or LoraConfig()
    state.check_servable(config.rank)
    modules = [*(ATTENTION if config.train_attn else ()), *(MLP if config.train_mlp else ())]
    if not modules:
        raise SpecError(
            "lora_config", "train_attn or train_mlp must be true (the unembedding is not trained)"
        )
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    targets = [m for m in PEFT_TARGET_MODULES if m in modules]
    lora = LoraSpec(r=config.rank, alpha=LORA_ALPHA, target_modules=targets)
    control = TinkerCreateModel(model_id=model_id, lora=lora, seed=config.seed or 0)
    answer = {"model_id": model_id, "type": "create_model"}
    return json_response(state.create(model_id, config.rank, control, answer))


@router.post("/get_info")
async def get_info(request: Request) -> Response:
    service = harli(request)
    state = service.tinker
    model_id = decode(await read_body(request, service.request_limit), GetInfo).model_id
    state.model(model_id)
    name = state.base_model
    return json_response({
        "type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": state.ranks[model_id],
        "model_name": name, "model_data": {"model_name": name, "tokenizer_id": name},
    })  # fmt: skip


@router.post("/forward_backward")
async def forward_backward(request: Request) -> Response:
    """A protobuf ``ForwardBackwardRequest`` (zstd or not), checked datum by datum before anything runs;
    ``forward_only`` is ``TrainingClient.forward``."""
    service = harli(request)
    state = service.tinker
    body = await read_body(request, service.request_limit)  # inflated within the limit
    decoded = decode_forward_backward(body)  # refused here, naming the datum, before anything runs
    model = state.model(decoded.model_id)

    async def run(request_id: str) -> Outcome:
        control = TinkerForwardBackward(model_id=decoded.model_id, request_id=request_id, body=body)
        return await state.queued(request_id, control)

    return _submitted(model.submit(decoded.seq_id, run), decoded.model_id)


@router.post("/optim_step")
async def optim_step(request: Request) -> Response:
    """One AdamW step over the gradients the client's ``forward_backward`` calls summed since the last."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), OptimStep)
    if body.adam_params is None:
        raise SpecError("adam_params", "is required (only AdamW is served)")
    adam = body.adam_params.params()
    model = state.model(body.model_id)

    async def run(request_id: str) -> Outcome:
        control = TinkerOptimStep(model_id=body.model_id, request_id=request_id, adam=adam)
        return await state.queued(request_id, control)

    return _submitted(model.submit(body.seq_id, run), body.model_id)


@router.post("/save_weights")
async def save_weights(request: Request) -> Response:
    """``TrainingClient.save_state(name)``: the training state, durably, as ``tinker://<model>/weights/<name>``."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), SaveWeights)
    model = state.model(body.model_id)
    path = TinkerPath.named(body.model_id, "weights", body.path)
    directory = state.store.directory(path)

    async def run(request_id: str) -> Outcome:
        if directory.exists() and not body.overwrite:
            return Outcome(
                error=f"{path} exists (save under another name, or with overwrite)", category="user"
            )
        control = TinkerSave(model_id=body.model_id, kind="weights", directory=str(directory))
        return await state.on_scheduler(control, {"path": str(path), "type": "save_weights"})

    return _submitted(model.submit(body.seq_id, run), body.model_id)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request) -> Response:
    """Named: ``tinker://<model>/sampler_weights/<name>``, sampled through ``create_sampling_session``.
    Unnamed (``save_weights_and_get_sampling_client``): a sampling session of its own, loaded at once."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), SaveWeightsForSampler)
    model_id = body.model_id
    model = state.model(model_id)
    if body.path is not None:
        path = TinkerPath.named(model_id, "sampler_weights", body.path)
        directory, session = state.store.directory(path), None
    elif body.sampling_session_seq_id is None:
        raise SpecError("sampling_session_seq_id", "is required for an unnamed snapshot (no path)")
    else:
        number = body.sampling_session_seq_id
        path, directory = None, state.store.unnamed(model_id, number)
        session_id = sampling_session_id(session_of(model_id), number)
        session = SamplingSession(session_id, state.base_model, directory=directory, unnamed=True)

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

    return _submitted(model.submit(body.seq_id, run), model_id)


@router.post("/load_weights")
async def load_weights(request: Request) -> Response:
    """A saved training state: into an existing model (``model_id`` and ``seq_id``), or, with
    ``session_id`` and ``model_seq_id`` (``create_training_client_from_state``), as a new model."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), LoadWeights)
    path = TinkerPath.parse(body.path, "path")
    if path.kind != "weights":
        raise SpecError("path", "load_weights takes a weights/ path (from save_weights), not a snapshot")
    directory = state.store.existing(path, "path")
    if body.model_id is not None:
        if body.seq_id is None:
            raise SpecError("seq_id", "is required with model_id")
        model_id, model = body.model_id, state.model(body.model_id)
    elif body.session_id is None or body.model_seq_id is None:
        field = "session_id" if body.session_id is None else "model_seq_id"
        raise SpecError(field, "is required: give model_id and seq_id, or session_id and model_seq_id")
    else:
        state.check_base_model(body.base_model)
        lora = TinkerStore.saved_lora(directory, "path")
        state.check_servable(lora.r)
        model_id, model = f"{body.session_id}:train:{body.model_seq_id}", None
    answer = {"path": str(path), "type": "load_weights", "model_id": model_id}
    control = TinkerLoad(
        model_id=model_id, directory=str(directory), optimizer=body.optimizer, create=model is None
    )
    if model is None:
        return json_response(state.create(model_id, lora.r, control, answer))

    async def run(request_id: str) -> Outcome:
        return await state.on_scheduler(control, answer)

    return _submitted(model.submit(body.seq_id, run), model_id)


auth.mark_routes(router)
