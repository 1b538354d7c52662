"""The Tinker API's sampling side: snapshots a training client saved, served hot as SGLang adapters, and
``asample`` answered by SGLang's own generation with logprobs.

A sampling session samples either the base model or one snapshot (``save_weights_for_sampler``: an
adapter in PEFT's format, ``core.tinker_store``). ``Snapshots`` loads a snapshot into SGLang the first
time a session samples it, through the same hot publishing a job's versions use (``srt.publisher``), and
keeps at most ``MAX_SERVED_SNAPSHOTS`` loaded: the least recently sampled one that no request is using is
unloaded to make room (a named snapshot stays on disk and loads again when sampled; an unnamed one, which
only its session can reach, is deleted with it, and its session then answers 404).

A sample request becomes ``num_samples`` SGLang generate requests on the same prompt, so decode batches
them with everything else the server serves and the QoS policy sees them as decode: the SLO that holds
for ``/generate`` holds for them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
from collections import Counter, OrderedDict
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from sglang.srt.managers.io_struct import GenerateReqInput

from sglang_harli.core.errors import NotFound, SpecError
from sglang_harli.core.tinker_codec import Sequence, encode_sample_response
from sglang_harli.srt import publisher

logger = logging.getLogger(__name__)

MAX_SERVED_SNAPSHOTS = 8
"""Snapshots loaded in SGLang at once (the least recently sampled unused one is unloaded beyond this)."""


@dataclass
class SamplingSession:
    session_id: str
    base_model: str
    model_path: str | None = None
    """The ``tinker://`` path sampled, or ``None`` for an unnamed snapshot or the base model."""
    directory: Path | None = None
    """The snapshot's adapter directory; ``None`` samples the base model."""
    unnamed: bool = False


@dataclass(frozen=True)
class SampleRequest:
    """``asample``'s body, checked (``parse``)."""

    tokens: list[int]
    num_samples: int
    sampling: dict
    """SGLang sampling parameters."""
    prompt_logprobs: bool

    @classmethod
    def parse(cls, body: dict, context_len: int | None) -> SampleRequest:
        chunks = (body.get("prompt") or {}).get("chunks")
        if not isinstance(chunks, list) or not chunks:
            raise SpecError("prompt.chunks", "must be a non-empty list of encoded_text chunks")
        tokens: list[int] = []
        for index, chunk in enumerate(chunks):
            if not isinstance(chunk, dict) or chunk.get("type") != "encoded_text":
                raise SpecError(f"prompt.chunks[{index}]", "only encoded_text chunks are served (no images)")
            values = chunk.get("tokens")
            if not isinstance(values, list) or not all(isinstance(t, int) and t >= 0 for t in values):
                raise SpecError(f"prompt.chunks[{index}].tokens", "must be a list of token ids")
            tokens.extend(values)
        if not tokens:
            raise SpecError("prompt", "is empty")
        count = body.get("num_samples", 1)
        if not isinstance(count, int) or not 1 <= count <= 128:
            raise SpecError("num_samples", "must be an integer from 1 to 128")
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(name):
                raise SpecError(name, "is not served (top-k logprobs); leave it 0")
        if body.get("target_prompt_logprobs") is not None or body.get("prompt_logprobs_last_n") is not None:
            raise SpecError("target_prompt_logprobs", "is not served")
        return cls(
            tokens=tokens,
            num_samples=count,
            sampling=_sampling(body.get("sampling_params") or {}, len(tokens), context_len),
            prompt_logprobs=bool(body.get("prompt_logprobs")),
        )


def _sampling(params: dict, prompt_len: int, context_len: int | None) -> dict:
    """The SDK's ``SamplingParams`` as SGLang's: ``stop`` absent stops at EOS, ``[]`` never stops."""
    if not isinstance(params, dict):
        raise SpecError("sampling_params", "must be an object")
    out: dict = {}
    for name, sglang_name, kind in (
        ("temperature", "temperature", (int, float)),
        ("top_p", "top_p", (int, float)),
        ("top_k", "top_k", int),
        ("max_tokens", "max_new_tokens", int),
        ("seed", "sampling_seed", int),
    ):
        value = params.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpecError(f"sampling_params.{name}", "has the wrong type")
        out[sglang_name] = value
    if out.get("temperature", 1.0) < 0:
        raise SpecError("sampling_params.temperature", "must be at least 0")
    if out.get("top_k") == -1:
        del out["top_k"]  # the whole vocabulary, SGLang's default
    room = (context_len - prompt_len) if context_len else None
    if room is not None and room < 1:
        raise SpecError("prompt", f"{prompt_len} tokens leave no room in the {context_len}-token context")
    if "max_new_tokens" not in out:
        out["max_new_tokens"] = room or 128
    elif out["max_new_tokens"] < 1:
        raise SpecError("sampling_params.max_tokens", "must be at least 1")
    stop = params.get("stop")
    if stop is None:
        pass
    elif isinstance(stop, str):
        out["stop"] = [stop]
    elif isinstance(stop, list) and not stop:
        out["ignore_eos"] = True
    elif isinstance(stop, list) and all(isinstance(s, int) for s in stop):
        out["stop_token_ids"] = stop
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        out["stop"] = stop
    else:
        raise SpecError("sampling_params.stop", "must be a string, a list of strings or a list of token ids")
    return out


class Snapshots:
    """Snapshots loaded into SGLang as adapters, least recently sampled first out."""

    def __init__(self, tokenizer_manager, limit: int = MAX_SERVED_SNAPSHOTS):
        self.tokenizer_manager, self.limit = tokenizer_manager, limit
        self._served: OrderedDict[str, Path] = OrderedDict()  # adapter name -> directory
        self._unnamed: set[str] = set()
        self._in_use: Counter[str] = Counter()
        self._loads = itertools.count(1)  # a version per load: a reloaded name never meets its old self
        self._lock = asyncio.Lock()

    @staticmethod
    def adapter_name(directory: Path) -> str:
        return "tinker-" + sha256(str(directory).encode()).hexdigest()[:16]

    async def acquire(self, session: SamplingSession) -> str:
        """The SGLang adapter name to sample ``session`` with, loaded if it is not; ``release`` it after."""
        directory = session.directory
        assert directory is not None
        name = self.adapter_name(directory)
        async with self._lock:
            if name in self._served:
                self._served.move_to_end(name)
            else:
                if not directory.is_dir():
                    raise NotFound("sampling_session_id", f"{session.session_id}'s snapshot was evicted")
                await publisher.publish_adapter(
                    self.tokenizer_manager, name, next(self._loads), str(directory)
                )
                self._served[name] = directory
                if session.unnamed:
                    self._unnamed.add(name)
            self._in_use[name] += 1
            await self._evict()
        return name

    def release(self, name: str) -> None:
        self._in_use[name] -= 1

    async def _evict(self) -> None:
        while len(self._served) > self.limit:
            victim = next((n for n in self._served if not self._in_use[n]), None)
            if victim is None:  # every loaded snapshot is being sampled: over the bound until one is not
                return
            directory = self._served.pop(victim)
            await publisher.unpublish(self.tokenizer_manager, victim)
            if victim in self._unnamed:
                self._unnamed.discard(victim)
                shutil.rmtree(directory, ignore_errors=True)
            logger.info("tinker snapshot %s unloaded (%s)", victim, directory)


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
