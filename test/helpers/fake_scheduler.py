"""A small fake of what SGLang's scheduler gives the finetune side, to drive its rooms without a server.

``FakeHost`` implements ``core.runner.host.Host`` over a plain transformers model of a checkpoint (the
"served" model): ``bind_model`` builds the training model over its tensors exactly as the server binds over
SGLang's (``core.training.base_model``, zero copy), adapter versions asked to be served are collected in
``published`` and Tinker outcomes in ``answers``. ``FakeScheduler`` wires the same ``Finetuning`` the server
wires and offers it places in a loop: an idle slice, or the gap before a decode step, as SGLang's loop
does; ``serve`` plays the tokenizer manager answering a publication.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.partition import make_partitioner
from sglang_harli.core.colocation.plan import Slot
from sglang_harli.core.colocation.timing import stopwatch
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.jobs.rehearsal import rehearsal_prompts, with_base_answers
from sglang_harli.core.jobs.spec import FinetuneJobSpec, ServingLimits, decode_spec
from sglang_harli.core.jobs.staging import discard_staged, stage_examples
from sglang_harli.core.jobs.submission import tokenize_job
from sglang_harli.core.runner.finetuning import Finetuning
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.wire.control import AdapterServed, AdapterVersion, ControlRequest

IDLE = Slot(next_decode=None, may_start=True)


class FakeHost:
    def __init__(self, model_dir: str | Path, *, limits: ServingLimits | None = None):
        self.model_path = str(model_dir)
        self.config = AutoConfig.from_pretrained(self.model_path)
        served = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.served = dict(served.named_parameters())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.eos_ids = {self.tokenizer.eos_token_id}
        self.limits = limits or ServingLimits(enable_lora=True, max_lora_rank=64)
        self.published: list[AdapterVersion] = []
        self.answers: dict[str, Outcome] = {}

    def bind_model(self, tensor_parallel=None):
        model = build_bound_model(self.config, lambda name, shape: self.served.get(name))
        storage = {t.untyped_storage().data_ptr() for t in self.served.values()}
        params = list(model.parameters())
        shared = sum(p.untyped_storage().data_ptr() in storage for p in params)
        return model, {"params": len(params), "shared_with_server": shared}

    def serving_limits(self) -> ServingLimits:
        return self.limits

    def publish(self, version: AdapterVersion) -> None:
        self.published.append(version)

    def answer(self, request_id: str, outcome: Outcome) -> None:
        self.answers[request_id] = outcome


class FakeScheduler:
    """``Finetuning`` over a ``FakeHost``, as ``srt.finetune.FinetuneService`` wires it over SGLang's."""

    def __init__(
        self,
        model_dir: str | Path,
        config: HarliConfig | None = None,
        host: FakeHost | None = None,
        lending=None,
    ):
        """``lending``: the trainer's memory (``core.runner.host.Lending``); ordinary memory by default."""
        self.config = config or HarliConfig()
        self.host = host or FakeHost(model_dir)
        partitioner = make_partitioner("cpu", enabled=False)
        self.colocation = CoLocation.from_config(
            self.config, splits={split.name: split.share for split in partitioner.splits}
        )
        self.finetuning = Finetuning(
            self.host,
            self.config,
            colocation=self.colocation,
            partitioner=partitioner,
            stopwatch=stopwatch("cpu"),
            lending=lending,
        )
        self.handlers = self.finetuning.handlers

    def call(self, request: ControlRequest):
        """A control request, as the scheduler's dispatcher hands it to its room."""
        return self.handlers[type(request)](request)

    def submit(self, spec: dict | FinetuneJobSpec, *, rehearsal_answers=(), base_kept=None):
        """``POST /harli/jobs`` as the HTTP side does it: decode, tokenize, add what the base model answered
        (here given: ``rehearsal_answers`` to the spec's rehearsal prompts, ``base_kept`` per probe), stage
        (with a state dir), send."""
        if isinstance(spec, dict):
            spec = decode_spec(msgspec.json.encode(spec))
        submit = tokenize_job(spec, self.host.tokenizer, data_dir=None, model_dir=self.host.model_path)
        prompts = rehearsal_prompts(spec.rehearsal, self.host.model_path) if spec.rehearsal else []
        tokenizer = self.host.tokenizer
        submit = with_base_answers(submit, tokenizer, prompts, list(rehearsal_answers), base_kept)
        if not self.config.state_dir:
            return self.call(submit)
        staged = stage_examples(self.config.state_dir, submit.examples)
        try:
            return self.call(msgspec.structs.replace(submit, examples=[], staged=staged))
        finally:
            discard_staged(self.config.state_dir, staged)

    def place(self, slot: Slot = IDLE, *, should_yield=lambda: False) -> None:
        """One place in the loop for finetune work."""
        if self.finetuning.has_work:
            self.finetuning.runner.train(lambda: slot, should_yield=should_yield)

    def run_until(self, done, *, places: int = 100_000, slot: Slot = IDLE) -> None:
        """Offer places until ``done()``, checked after every unit."""
        for _ in range(places):
            if done():
                return
            self.place(slot, should_yield=done)
        raise AssertionError(f"not done after {places} places")

    def examples(self, spec: dict):
        """``spec``'s dataset, tokenized as the HTTP side tokenizes it."""
        return tokenize_job(
            decode_spec(msgspec.json.encode(spec)), self.host.tokenizer, data_dir=None, model_dir=None
        ).examples

    def serve(self, error: str | None = None) -> None:
        """The tokenizer manager answers every publication asked so far: ``publishing`` jobs complete."""
        while self.host.published:
            version = self.host.published.pop(0)
            self.call(AdapterServed(name=version.name, version=version.version, error=error))

    def job(self, name: str):
        return self.finetuning.jobs.book.get(name)
