"""A job submission made ready for the scheduler: its dataset read and tokenized, its eval set built.

The HTTP side does this, off the event loop and off the scheduler, so a bad file is refused before the
scheduler sees anything; what it sends is one ``SubmitJob`` (``core.wire.control``).
"""

from __future__ import annotations

from sglang_harli.core.errors import SpecError
from sglang_harli.core.jobs.data import load_examples
from sglang_harli.core.jobs.eval_data import build_eval_data
from sglang_harli.core.jobs.spec import FinetuneJobSpec
from sglang_harli.core.wire.control import SubmitJob


def tokenize_job(
    spec: FinetuneJobSpec,
    tokenizer,
    *,
    data_dir: str | None,
    model_dir: str | None,
    context_len: int | None = None,
    max_file_bytes: int | None = None,
) -> SubmitJob:
    """``spec``'s examples and eval data, tokenized as inference tokenizes them; ``SpecError`` (naming the
    field) for a dataset that cannot be used or sequences longer than the model's context."""
    if tokenizer is None:
        raise SpecError("dataset", "the server runs with --skip-tokenizer-init and cannot tokenize datasets")
    if context_len and spec.training.max_seq_len > context_len:
        raise SpecError(
            "training.max_seq_len",
            f"{spec.training.max_seq_len} is longer than the model's context length ({context_len})",
        )
    examples, _ = load_examples(
        spec.dataset.records,
        spec.dataset.path,
        tokenizer,
        data_dir=data_dir,
        max_seq_len=spec.training.max_seq_len,
        max_file_bytes=max_file_bytes,
    )
    examples, evaluation = build_eval_data(
        spec, examples, tokenizer, data_dir=data_dir, model_dir=model_dir, max_file_bytes=max_file_bytes
    )
    return SubmitJob(spec=spec, count=len(examples), examples=examples, evaluation=evaluation)
