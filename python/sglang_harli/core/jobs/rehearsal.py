"""Rehearsal: the base model's own answers to other prompts, trained on beside a job's examples.

A few facts trained for many epochs teach more than the facts: "The capital of <anything> is <a new
name>". Training on what the base model itself says about other questions of the same shapes keeps those
answers where they were (replay of the model's own outputs, as in self-distillation against forgetting).
The HTTP side, when a job is submitted, asks the served base model (no adapter) to answer each prompt
greedily, through the server itself (``srt.jobs.routes``), and turns prompt and answer into examples here;
they travel and are stored with the job's examples (its last ``rehearsal`` ones), so a resumed job trains
on the same answers. The trainer mixes them in at the spec's ratio (``core.training.trainer.StepPlan``).

The same pass asks the base model the job's retention probes, so the retention floor counts only the
probes the base model answers right (``EvalData.base_kept``).
"""

from __future__ import annotations

from sglang_harli.core.jobs.data import DatasetError, Example, record_to_example
from sglang_harli.core.jobs.eval_data import builtin_set
from sglang_harli.core.jobs.spec import FinetuneJobSpec, RehearsalPrompt, RehearsalSpec
from sglang_harli.core.wire.control import SubmitJob
from sglang_harli.models.packaged import REHEARSAL_FILE


def rehearsal_prompts(spec: RehearsalSpec, model_dir: str | None) -> list[RehearsalPrompt]:
    """The prompts of ``spec``; ``"builtin"``: the model directory's set, or ``DatasetError`` naming
    ``rehearsal.prompts`` where it ships none."""
    if spec.prompts != "builtin":
        return list(spec.prompts)
    return builtin_set(
        model_dir, REHEARSAL_FILE, list[RehearsalPrompt], "rehearsal.prompts", "rehearsal prompts"
    )


def with_base_answers(
    submit: SubmitJob,
    tokenizer,
    prompts: list[RehearsalPrompt],
    answers: list[str],
    base_kept: list[bool] | None,
) -> SubmitJob:
    """``submit`` with the rehearsal examples the base model's ``answers`` make appended to its examples
    (its last ``rehearsal``), and ``base_kept`` (which retention probes it answered right) on its eval
    data."""
    if base_kept is not None and submit.evaluation is not None:
        submit.evaluation.base_kept = list(base_kept)
    if prompts:
        examples = rehearsal_examples(submit.spec, prompts, answers, tokenizer)
        submit.examples = [*submit.examples, *examples]
        submit.count += len(examples)
        submit.rehearsal = len(examples)
    return submit


def rehearsal_examples(
    spec: FinetuneJobSpec, prompts: list[RehearsalPrompt], answers: list[str], tokenizer
) -> list[Example]:
    """Each prompt with the base model's answer, as a training example (the answer is the target), cut to
    ``training.max_seq_len`` as the dataset's examples are; an empty answer, or one cut away entirely,
    teaches nothing and is left out. ``DatasetError`` naming ``rehearsal`` if none is left."""
    examples, limit = [], spec.training.max_seq_len
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        if not answer.strip():
            continue
        if isinstance(prompt, list):
            record = {"messages": [*prompt, {"role": "assistant", "content": answer}]}
        else:
            record = {"prompt": prompt, "completion": answer}
        where = f"rehearsal.prompts[{i}]"
        example = record_to_example(record, tokenizer, where=where)
        if len(example.input_ids) > limit:
            example = Example(example.input_ids[:limit], example.loss_mask[:limit])
            if not any(example.loss_mask):
                continue
        examples.append(example)
    if not examples:
        raise DatasetError(
            "rehearsal",
            "none of the base model's answers to the prompts has a token to train on within "
            f"training.max_seq_len ({limit})",
        )
    return examples
