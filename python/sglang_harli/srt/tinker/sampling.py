"""The Tinker API's sampling routes: sampling sessions, and ``asample`` answered by SGLang's own
generation with logprobs.

A sample request becomes ``num_samples`` SGLang generate requests on the same prompt, so decode batches
them with everything else the server serves and the QoS policy sees them as decode: the SLO that holds
for ``/generate`` holds for them. A snapshot is loaded the first time it is sampled
(``srt.tinker.snapshots``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from sglang.srt.managers.io_struct import GenerateReqInput

from sglang_harli.core.errors import HarliError, SpecError
from sglang_harli.core.tinker.codec import Sequence, encode_sample_response
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.tinker.sessions import sampling_session_id
from sglang_harli.core.tinker.store import TinkerPath
from sglang_harli.srt.body import decode, json_response, read_body
from sglang_harli.srt.service import harli
from sglang_harli.srt.tinker import auth
from sglang_harli.srt.tinker.bodies import CreateSamplingSession, Sample, SamplingParams
from sglang_harli.srt.tinker.snapshots import SamplingSession
from sglang_harli.srt.tinker.state import KEEP_SAMPLE_IDS

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["tinker"])


@dataclass(frozen=True)
class SampleRequest:
    """``asample``'s body, as SGLang will run it (``from_body``)."""

    tokens: list[int]
    num_samples: int
    sampling: dict
    """SGLang sampling parameters."""
    prompt_logprobs: bool

    @classmethod
    def from_body(cls, body: Sample, context_len: int | None) -> SampleRequest:
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if getattr(body, name):
                raise SpecError(name, "is not served (top-k logprobs); leave it 0")
        if body.target_prompt_logprobs is not None or body.prompt_logprobs_last_n is not None:
            raise SpecError("target_prompt_logprobs", "is not served")
        tokens = [token for chunk in body.prompt.chunks for token in chunk.tokens]
        if not tokens:
            raise SpecError("prompt", "is empty")
        return cls(
            tokens=tokens,
            num_samples=body.num_samples,
            sampling=_sampling(body.sampling_params, len(tokens), context_len),
            prompt_logprobs=bool(body.prompt_logprobs),
        )


def _sampling(params: SamplingParams, prompt_len: int, context_len: int | None) -> dict:
    """The SDK's ``SamplingParams`` as SGLang's: ``stop`` absent stops at EOS, ``[]`` never stops."""
    out: dict = {"temperature": params.temperature, "top_p": params.top_p}
    if params.top_k != -1:  # -1: the whole vocabulary, SGLang's default
        out["top_k"] = params.top_k
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    room = (context_len - prompt_len) if context_len else None
    if room is not None and room < 1:
        raise SpecError("prompt", f"{prompt_len} tokens leave no room in the {context_len}-token context")
    out["max_new_tokens"] = params.max_tokens if params.max_tokens is not None else room or 128
    stop = params.stop
    if isinstance(stop, str):
        out["stop"] = [stop]
    elif stop == []:
        out["ignore_eos"] = True
    elif stop is not None and all(isinstance(s, int) for s in stop):
        out["stop_token_ids"] = stop
    elif stop is not None and all(isinstance(s, str) for s in stop):
        out["stop"] = stop
    elif stop is not None:
        raise SpecError("sampling_params.stop", "must be a string, a list of strings or a list of token ids")
    return out


async def generate(tokenizer_manager, request: SampleRequest, adapter: str | None) -> bytes:
    """Sample ``request`` with SGLang (``adapter``: a loaded snapshot, or ``None`` for the base model);
    the protobuf ``SampleResponse``. Sample ``i`` gets seed ``seed + i`` when a seed is given."""

    async def one(index: int) -> dict:
        sampling = dict(request.sampling)
        if "sampling_seed" in sampling:
            sampling["sampling_seed"] += index
        wants_prompt = request.prompt_logprobs and index == 0
        obj = GenerateReqInput(
            input_ids=list(request.tokens),
            sampling_params=sampling,
            return_logprob=True,
            logprob_start_len=0 if wants_prompt else -1,
            lora_path=adapter,
        )
        return await tokenizer_manager.generate_request(obj).__anext__()

    outputs = await asyncio.gather(*(one(i) for i in range(request.num_samples)))
    sequences = []
    for out in outputs:
        meta = out["meta_info"]
        reason = (meta.get("finish_reason") or {}).get("type")
        if reason not in ("stop", "length"):
            raise RuntimeError(f"generation ended with {meta.get('finish_reason')!r}")
        pairs = meta["output_token_logprobs"]
        sequences.append(
            Sequence(
                tokens=[t for _, t, *_ in pairs], logprobs=[lp for lp, *_ in pairs], stopped=reason == "stop"
            )
        )
    prompt_logprobs = None
    if request.prompt_logprobs:
        prompt_logprobs = [lp for lp, *_ in outputs[0]["meta_info"]["input_token_logprobs"]]
    return encode_sample_response(sequences, prompt_logprobs)


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request) -> Response:
    """A sampling session: of a snapshot (``model_path``) or of the base model."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), CreateSamplingSession)
    state.check_base_model(body.base_model)
    sampler = sampling_session_id(body.session_id, body.sampling_session_seq_id)
    if body.model_path is not None:
        path = TinkerPath.parse(body.model_path, "model_path")
        if path.kind != "sampler_weights":
            raise SpecError("model_path", "samples a sampler_weights/ path (from save_weights_for_sampler)")
        directory = state.store.existing(path, "model_path")
        session = SamplingSession(sampler, state.base_model, model_path=str(path), directory=directory)
    elif body.base_model is not None:
        session = SamplingSession(sampler, state.base_model)
    else:
        raise SpecError("model_path", "give model_path (a snapshot) or base_model")
    state.sampling.setdefault(sampler, session)
    return json_response({"sampling_session_id": sampler, "type": "create_sampling_session"})


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request) -> Response:
    """What a sampling session samples."""
    session = harli(request).tinker.sampler(sampler_id, "sampler_id")
    return json_response(
        {"sampler_id": sampler_id, "base_model": session.base_model, "model_path": session.model_path}
    )


@router.post("/asample")
async def asample(request: Request) -> Response:
    """``SamplingClient.sample`` / ``compute_logprobs``: ``num_samples`` generations through SGLang; the
    reply names each sample (``sample_sequence_ids``), the future resolves to a protobuf SampleResponse."""
    service = harli(request)
    state = service.tinker
    body = decode(await read_body(request, service.request_limit), Sample)
    session = state.sampler(body.sampling_session_id, "sampling_session_id")
    key = (body.sampling_session_id, body.seq_id)
    if key in state.samples:  # a resent submission
        return json_response(state.samples[key])
    sample = SampleRequest.from_body(body, state.context_len)
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
    return json_response(reply)


auth.mark_routes(router)
