"""What the served base model answers, asked when a job is submitted: its rehearsal prompts (turned into
examples, ``core.jobs.rehearsal``) and its retention probes (which of them the floor counts).

Asked through SGLang's own request path (``TokenizerManager.generate_request``), greedily, with no
adapter, so the answers are exactly what a client of the server gets from the base model, and the requests
are decoded beside everything else the server is serving.
"""

from __future__ import annotations

import asyncio

from sglang.srt.managers.io_struct import GenerateReqInput

from sglang_harli.core.jobs.eval_data import prompt_ids
from sglang_harli.core.jobs.evaluation import kept
from sglang_harli.core.jobs.rehearsal import rehearsal_prompts, with_base_answers
from sglang_harli.core.wire.control import SubmitJob


async def _answers(tokenizer_manager, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    async def one(ids: list[int]) -> str:
        obj = GenerateReqInput(
            input_ids=ids,
            sampling_params={"temperature": 0.0, "max_new_tokens": max_new_tokens},
        )
        out = await tokenizer_manager.generate_request(obj).__anext__()
        return out["text"]

    return list(await asyncio.gather(*(one(ids) for ids in prompts)))


async def ask_base_model(tokenizer_manager, submit: SubmitJob, model_dir: str | None) -> SubmitJob:
    """``submit`` with the base model's rehearsal examples appended to its examples and, where it has
    retention probes, which of them the base model answers right."""
    spec, tokenizer = submit.spec, tokenizer_manager.tokenizer
    probes = submit.evaluation.probes if submit.evaluation is not None else []
    prompts, ids = [], []
    if spec.rehearsal is not None:
        prompts = await asyncio.to_thread(rehearsal_prompts, spec.rehearsal, model_dir)
        ids = [prompt_ids(p, tokenizer, f"rehearsal.prompts[{i}]") for i, p in enumerate(prompts)]
    if not prompts and not probes:
        return submit
    rehearsal_tokens = spec.rehearsal.max_new_tokens if spec.rehearsal is not None else 1
    answers, probe_answers = await asyncio.gather(
        _answers(tokenizer_manager, ids, rehearsal_tokens),
        _answers(tokenizer_manager, [p.input_ids for p in probes], submit.evaluation.max_new_tokens)
        if probes
        else asyncio.sleep(0, result=[]),
    )
    base_kept = [kept(p, a) for p, a in zip(probes, probe_answers, strict=True)] if probes else None
    return await asyncio.to_thread(with_base_answers, submit, tokenizer, prompts, answers, base_kept)
