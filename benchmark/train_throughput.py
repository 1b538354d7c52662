"""Training throughput: ``LoraTrainer`` against a plain transformers + PEFT loop, side by side.

The trainer packs each micro-batch padding-free into one row and asks the model for logits only at target
positions (``logits_to_keep``); the textbook loop pads, masks and computes every logit. Whether that pays is a
ratio, so both run here in one process on the same examples, LoRA, hyper-parameters and micro-batch order,
alternating which goes first so drift (thermal, caches) does not favour one side.

    python -m benchmark.train_throughput                  # preset `small`, the figures in RESULTS.md
    python -m benchmark.train_throughput --model tiny     # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import torch
import torch.nn.functional as F
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, get_scheduler

from benchmark.report import Target, _table, verdict
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.spec import PEFT_TARGET_MODULES, LoraSpec, TrainingSpec
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.lora import lora_config
from sglang_harli.core.training.trainer import LoraTrainer, plan_steps
from sglang_harli.models.builtin import PACKAGED, PRESETS, SPECIAL_TOKENS, materialize

ALL_PRESETS = {**PRESETS, **PACKAGED}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
WARMUP_STEPS = 1
"""Optimizer steps run before the clock starts, on both sides (first-call allocations, lazy AdamW state)."""
TRAIN_TARGET = 1.0
"""The ``train`` part's target: tokens/s of the trainer over plain transformers + PEFT's, same examples."""


class Timing(msgspec.Struct):
    tokens: int
    """Sum of the lengths of the examples trained while timed."""
    seconds: float
    final_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class Repeat(msgspec.Struct):
    repeat: int
    first: str
    ours: Timing
    reference: Timing

    @property
    def ratio(self) -> float:
        return self.ours.tokens_per_s / self.reference.tokens_per_s


def make_examples(count: int, max_seq_len: int, vocab: int, seed: int = 0) -> list[Example]:
    """Prompt/completion-shaped: lengths uniform in [max_seq_len/4, max_seq_len], targets the second half."""
    g = torch.Generator().manual_seed(seed)
    low = max(2, max_seq_len // 4)
    examples = []
    for _ in range(count):
        n = int(torch.randint(low, max_seq_len + 1, (1,), generator=g))
        ids = torch.randint(len(SPECIAL_TOKENS), vocab, (n,), generator=g).tolist()
        examples.append(Example(input_ids=ids, loss_mask=[i >= n // 2 for i in range(n)]))
    return examples


def load_average() -> str:
    """Other processes stall OpenMP barriers, so a busy machine is worth seeing next to the figures."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(
    config, tensors: dict[str, torch.Tensor], examples: list[Example], lora: LoraSpec, training: TrainingSpec
) -> Timing:
    device = next(iter(tensors.values())).device
    model = build_bound_model(config, tensors).to(device)  # moves the rotary buffers; params are aliased
    trainer = LoraTrainer(model, examples, lora, training)
    while trainer.step < WARMUP_STEPS and trainer.run_unit():
        pass
    warm_tokens = trainer.tokens_trained
    synchronize(device)
    started = time.perf_counter()
    trainer.run()
    synchronize(device)
    seconds = time.perf_counter() - started
    return Timing(trainer.tokens_trained - warm_tokens, seconds, float(trainer.loss))


def run_reference(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    examples: list[Example],
    lora: LoraSpec,
    training: TrainingSpec,
) -> Timing:
    """The textbook loop of test/test_trainer.py: right-padded batches, attention mask, shifted masked CE."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return train_reference(model, device, examples, lora, training)


def train_reference(
    model: torch.nn.Module,
    device: torch.device,
    examples: list[Example],
    lora: LoraSpec,
    training: TrainingSpec,
) -> Timing:
    """``run_reference``'s loop on a causal LM already built (``benchmark.gpu`` binds one to random
    weights it holds on the GPU); PEFT wraps ``model`` in place."""
    torch.manual_seed(training.seed)
    model = get_peft_model(model, lora_config(lora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    total = plan_steps(len(examples), training)
    scheduler = get_scheduler(SCHEDULERS[training.lr_scheduler], optimizer, training.warmup_steps, total)

    def batch_tensors(batch: Sequence[Example]) -> tuple[torch.Tensor, ...]:
        width = max(len(e.input_ids) for e in batch)
        pad = [width - len(e.input_ids) for e in batch]
        ids = [e.input_ids + [0] * p for e, p in zip(batch, pad, strict=True)]
        attention = [[1] * len(e.input_ids) + [0] * p for e, p in zip(batch, pad, strict=True)]
        labels = [
            [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)] + [-100] * p
            for e, p in zip(batch, pad, strict=True)
        ]
        return tuple(torch.tensor(x, device=device) for x in (ids, attention, labels))

    def train_step(group: list[list[int]]) -> tuple[float, int]:
        n_targets = sum(sum(examples[i].loss_mask[1:]) for mb in group for i in mb)
        loss_total, tokens = 0.0, 0
        for mb in group:
            batch = [examples[i] for i in mb]
            ids, attention, labels = batch_tensors(batch)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()  # as transformers' own loss does
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            )
            (loss / n_targets).backward()
            loss_total += float(loss.detach())
            tokens += sum(len(e.input_ids) for e in batch)
        if training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_total / max(n_targets, 1), tokens

    steps: list[list[list[int]]] = []
    for epoch in range(training.epochs):  # the trainer's plan: the same seeded permutation per epoch
        g = torch.Generator().manual_seed(training.seed * 100_003 + epoch)
        order = torch.randperm(len(examples), generator=g).tolist()
        mbs, accumulation = training.micro_batch_size, training.gradient_accumulation_steps
        micro_batches = [order[i : i + mbs] for i in range(0, len(order), mbs)]
        steps += [micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)]
    steps = steps[:total]

    for group in steps[:WARMUP_STEPS]:
        train_step(group)
    synchronize(device)
    started = time.perf_counter()
    loss, tokens = float("nan"), 0
    for group in steps[WARMUP_STEPS:]:
        loss, step_tokens = train_step(group)
        tokens += step_tokens
    synchronize(device)
    return Timing(tokens, time.perf_counter() - started, loss)


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    path = materialize(args.model)
    config = AutoConfig.from_pretrained(path)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    tensors = {
        n: t.to(device=device, dtype=dtype) for n, t in load_file(str(path / "model.safetensors")).items()
    }
    if config.tie_word_embeddings:  # the head is the embedding, as SGLang serves it
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    params = sum(
        t.numel() for n, t in tensors.items() if not (config.tie_word_embeddings and n == "lm_head.weight")
    )
    examples = make_examples(args.examples, args.max_seq_len, config.vocab_size, seed=args.seed)
    lora = LoraSpec(r=16, alpha=32, target_modules=list(PEFT_TARGET_MODULES))
    training = TrainingSpec(
        epochs=1,
        micro_batch_size=args.micro_batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        learning_rate=2e-4,
        lr_scheduler="linear",
    )
    steps = plan_steps(len(examples), training)
    if steps <= WARMUP_STEPS:
        raise SystemExit(
            f"{len(examples)} examples make {steps} step(s); need more than {WARMUP_STEPS} to time"
        )
    log(
        f"model {args.model} ({params / 1e6:.1f}M params, {ALL_PRESETS[args.model].description}), "
        f"dtype {args.dtype}, device {device}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, load average {load_average()}"
    )
    log(
        f"{len(examples)} examples, {sum(len(e.input_ids) for e in examples)} tokens, "
        f"micro-batch {args.micro_batch_size}, max_seq_len {args.max_seq_len}, {steps} steps an epoch "
        f"({WARMUP_STEPS} untimed warm-up), "
        f"LoRA r={lora.r} alpha={lora.alpha:g} on {','.join(lora.target_modules)}"
    )

    repeats: list[Repeat] = []
    for r in range(args.repeats):
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        results: dict[str, Timing] = {}
        for side in order:
            gc.collect()
            if side == "ours":
                results[side] = run_ours(config, tensors, examples, lora, training)
            else:
                results[side] = run_reference(path, dtype, device, examples, lora, training)
            gc.collect()
        if results["ours"].tokens != results["reference"].tokens:
            raise AssertionError(f"token counts differ: {results}")
        repeat = Repeat(r, order[0], results["ours"], results["reference"])
        repeats.append(repeat)
        log(
            f"repeat {r}: ours {repeat.ours.tokens_per_s:.1f} tok/s, reference "
            f"{repeat.reference.tokens_per_s:.1f} tok/s, ratio {repeat.ratio:.3f} "
            f"(final loss {repeat.ours.final_loss:.4f} vs {repeat.reference.final_loss:.4f})"
        )

    log(f"load average {load_average()} (other processes on the machine skew wall-clock figures)")
    return {
        "model": args.model,
        "params": params,
        "dtype": args.dtype,
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg(),
        "examples": len(examples),
        "micro_batch_size": args.micro_batch_size,
        "max_seq_len": args.max_seq_len,
        "lora": msgspec.to_builtins(lora),
        "warmup_steps": WARMUP_STEPS,
        "repeats": [
            {
                "repeat": x.repeat,
                "first": x.first,
                "tokens": x.ours.tokens,
                "ours_s": x.ours.seconds,
                "reference_s": x.reference.seconds,
                "ours_tokens_per_s": x.ours.tokens_per_s,
                "reference_tokens_per_s": x.reference.tokens_per_s,
                "ratio": x.ratio,
                "ours_final_loss": x.ours.final_loss,
                "reference_final_loss": x.reference.final_loss,
            }
            for x in repeats
        ],
        "median_ratio": statistics.median(x.ratio for x in repeats),
    }


def print_table(result: dict) -> None:
    header = ("repeat", "first", "tokens", "ours tok/s", "reference tok/s", "ours/reference")
    rows = [
        (
            str(x["repeat"]),
            x["first"],
            str(x["tokens"]),
            f"{x['ours_tokens_per_s']:.1f}",
            f"{x['reference_tokens_per_s']:.1f}",
            f"{x['ratio']:.3f}",
        )
        for x in result["repeats"]
    ]
    footer = f"median ours/reference: {result['median_ratio']:.3f}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        for line in (header, *rows):
            print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        print(footer)
        return
    table = Table(title=f"LoRA training throughput, {result['model']} {result['dtype']} {result['device']}")
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(footer)


def train_summary(result: dict) -> tuple[list[Target], str, list[str]]:
    """``measure``'s figures as the ``train`` part's record in ``RESULTS.md`` (``benchmark.run``): its
    target, table and notes."""
    rows = [
        [str(r["repeat"]), r["first"], str(r["tokens"]), f"{r['ours_tokens_per_s']:.1f}",
         f"{r['reference_tokens_per_s']:.1f}", f"{r['ratio']:.3f}"]
        for r in result["repeats"]
    ]  # fmt: skip
    table = _table(["repeat", "first", "tokens", "ours tok/s", "reference tok/s", "ours/reference"], rows)
    ratio = result["median_ratio"]
    targets = [
        Target(
            target=f"trainer tokens/s >= {TRAIN_TARGET:g}x plain transformers + PEFT (`{result['model']}`)",
            measured=f"{ratio:.3f} (median of {len(result['repeats'])})",
            verdict=verdict(ratio >= TRAIN_TARGET),
        ),
    ]  # MFU is the `gpu` part's target
    notes = [
        f"{result['examples']} examples, max_seq_len {result['max_seq_len']}, micro-batch "
        f"{result['micro_batch_size']}, {result['dtype']} on {result['device']}, torch threads "
        f"{result['torch_threads']}; load average after "
        + ", ".join(f"{x:.2f}" for x in result["load_average_after"])
        + "."
    ]
    return targets, table, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=sorted(ALL_PRESETS), help="built-in preset")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="dataset, shuffle and LoRA init")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")

    result = measure(args, lambda line: print(line, flush=True))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
