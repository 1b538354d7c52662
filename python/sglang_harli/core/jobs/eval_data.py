"""A job's tokenized eval set and retention probes, built on the HTTP side and sent to the scheduler."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec

from sglang_harli.core.jobs.data import DatasetError, Example, load_examples
from sglang_harli.core.jobs.spec import EvalSpec, FinetuneJobSpec, RetentionProbe
from sglang_harli.models.packaged import RETENTION_FILE


class Probe(msgspec.Struct, frozen=True, array_like=True):
    input_ids: list[int]
    """The prompt, tokenized as the server tokenizes the request it stands for."""
    expect: str
    question: str = ""
    """The prompt (a chat probe's last message) as given, to name the probe in errors."""


class EvalData(msgspec.Struct, kw_only=True):
    """A job's tokenized eval set and probes, built by the HTTP side and stored with the job."""

    examples: list[Example] = msgspec.field(default_factory=list)
    probes: list[Probe] = msgspec.field(default_factory=list)
    max_new_tokens: int = 24
    base_kept: list[bool] | None = None
    """Per probe, whether the served base model answered it right when the job was submitted: the
    retention floor counts those (``None``: every probe)."""


# -- building the eval data (HTTP side) ---------------------------------------------------------------
def build_eval_data(
    spec: FinetuneJobSpec,
    examples: list[Example],
    tokenizer,
    *,
    data_dir: str | None,
    model_dir: str | None,
    max_file_bytes: int | None = None,
) -> tuple[list[Example], EvalData | None]:
    """The training examples (less any held-out split) and the job's eval data; ``DatasetError`` naming
    the ``eval`` field when the eval set or a probe cannot be used."""
    evaluation = spec.eval
    if evaluation is None:
        return examples, None
    eval_examples: list[Example] = []
    if evaluation.split is not None:
        examples, eval_examples = split_examples(examples, evaluation.split, spec.training.seed)
    elif evaluation.records is not None or evaluation.path is not None:
        field = "eval.records" if evaluation.records is not None else "eval.path"
        try:
            eval_examples, _ = load_examples(
                evaluation.records,
                evaluation.path,
                tokenizer,
                data_dir=data_dir,
                max_seq_len=spec.training.max_seq_len,
                max_file_bytes=max_file_bytes,
            )
        except DatasetError as exc:
            where = exc.field.replace("dataset.records", "eval.records").replace("dataset.path", "eval.path")
            raise DatasetError(field if where == "dataset" else where, exc.message) from None
    probes = [
        tokenize_probe(probe, tokenizer, f"eval.retention[{i}]")
        for i, probe in enumerate(retention_probes(evaluation, model_dir))
    ]
    return examples, EvalData(examples=eval_examples, probes=probes, max_new_tokens=evaluation.max_new_tokens)


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of ``examples`` (at least one), drawn with ``seed``; both sides non-empty."""
    held = max(1, round(len(examples) * fraction))
    if held >= len(examples):
        raise DatasetError(
            "eval.split", f"holding out {fraction} of {len(examples)} examples leaves none to train on"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]


def builtin_set(model_dir: str | None, filename: str, kind, field: str, what: str) -> list:
    """A set a built-in pretrained model ships beside its checkpoint (``filename``, decoded as ``kind``), or
    ``DatasetError`` naming ``field`` where the model ships none."""
    path = Path(model_dir or "") / filename
    if not path.is_file():
        raise DatasetError(
            field, f'"builtin" needs a model that ships {what} (harli:smollm2-135m does); give {what}'
        )
    return msgspec.json.decode(path.read_bytes(), type=kind)


def retention_probes(evaluation: EvalSpec, model_dir: str | None) -> list[RetentionProbe]:
    if evaluation.retention != "builtin":
        return list(evaluation.retention)
    return builtin_set(model_dir, RETENTION_FILE, list[RetentionProbe], "eval.retention", "retention probes")


def prompt_ids(prompt: str | list[dict], tokenizer, where: str) -> list[int]:
    """``prompt`` tokenized as the server tokenizes a completion (a string) or a chat request (messages,
    rendered with the chat template and its generation prompt); ``DatasetError`` naming ``where``."""
    if isinstance(prompt, list):
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors, roles a template rejects
            raise DatasetError(where, f"the chat template cannot render 'messages': {exc}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise DatasetError(where, "tokenizes to nothing")
    return ids


def tokenize_probe(probe: RetentionProbe, tokenizer, where: str) -> Probe:
    ids = prompt_ids(probe.messages if probe.messages is not None else probe.prompt or "", tokenizer, where)
    question = probe.prompt if probe.messages is None else str(probe.messages[-1].get("content", ""))
    return Probe(input_ids=ids, expect=probe.expect, question=question)
