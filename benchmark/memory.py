"""Memory lending, measured without a server: what a training step needs beyond the KV pool, the largest
micro-batch a fixed trainer budget allows, and what a reclaim costs.

The KV pool is modelled exactly as SGLang lays it out (per layer, a K and a V buffer of
``(tokens, kv_heads, head_dim)`` rows in the model's dtype) and lent the way the server lends it: runs of
free rows, scattered as busy decode leaves them (``--run-tokens`` long). Everything else is the real
trainer and ``core.training.memory.ActivationStore``, so this runs on the GPU box too (no SGLang needed).

- **Non-KV memory of a step**: peak bytes of saved activations in ordinary memory over one optimizer
  step (the store's own accounting, tensor by tensor) plus the LoRA training state (weights, gradients,
  AdamW moments) less the gradients that lived in lent pages, with and without lending, and on CUDA the
  device allocator's peak beside it.
- **Largest micro-batch under a budget**: micro_batch_size doubled, then bisected, until one micro-batch
  raises ``TrainerMemoryError``, with and without the lent pool.
- **Reclaim cost**: time from ``reclaim()`` to the regions being free, for a micro-batch caught halfway
  through its forward, by spilling (copy out) or dropping it, at several lent sizes.

    python -m benchmark.memory                      # the figures in RESULTS.md (about a minute on CPU)
    python -m benchmark.memory --model small --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.memory import ActivationStore, TrainerMemoryError
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.models.builtin import materialize

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraSpec(r=16, alpha=32, target_modules=MODULES)


def examples(vocab: int, count: int, length: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, loss_mask=[i >= length // 4 for i in range(length)]))
    return out


class Pool:
    """A KV pool laid out as SGLang's ``MHATokenToKVPool``, lent in scattered runs of rows."""

    def __init__(self, config, tokens: int, dtype: torch.dtype, device: str):
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = config.num_hidden_layers
        shape = (tokens + 1, heads, head_dim)  # row 0 is SGLang's padding slot
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * layers)]
        self.tokens = tokens
        self.bytes_per_token = sum(b[0].numel() * b.element_size() for b in self.buffers)

    def regions(self, tokens: int, run: int) -> list[torch.Tensor]:
        """``tokens`` rows as runs of ``run`` rows, every other run (the rest is decode's)."""
        regions, start = [], 1
        while tokens > 0 and start + run <= self.tokens:
            take = min(run, tokens)
            regions += [b[start : start + take].reshape(-1).view(torch.uint8) for b in self.buffers]
            tokens -= take
            start += 2 * run
        if tokens > 0:
            raise ValueError("the pool is too small for this loan")
        return regions


def make_trainer(args, served, config, micro_batch: int, store: ActivationStore | None):
    training = TrainingSpec(
        epochs=1, micro_batch_size=micro_batch, max_seq_len=args.seq_len, learning_rate=1e-4
    )
    model = build_bound_model(config, served)
    trainer = LoraTrainer(
        model,
        examples(config.vocab_size, micro_batch, args.seq_len),
        LORA,
        training,
        layers_per_unit=1,
        saved_tensor_hooks=None if store is None else store.hooks,
        on_micro_batch_end=None if store is None else (lambda tokens: store.micro_batch_done()),
        place_grads=None if store is None else store.place_grads,
    )
    if store is not None:
        store.keep(trainer.model.parameters())
    return trainer


def one_step(trainer, store: ActivationStore) -> int:
    """Run one optimizer step; returns the most gradient bytes that lived in lent regions."""
    grads = 0
    while trainer.step == 0 and trainer.run_unit():
        grads = max(grads, store.stats().grad_bytes)
    return grads


def step_memory(args, served, config, pool: Pool) -> dict:
    out = {}
    for lent in (False, True):
        store = ActivationStore()
        trainer = make_trainer(args, served, config, args.micro_batch, store)
        if not lent:
            trainer.place_grads = None
        if lent:  # what the server lends: the measured demand and 10% slack, plus the gradients
            grads = sum(p.numel() * p.element_size() for p in trainer.params)
            need = out["alone"]["saved_bytes"] * 1.1 + grads
            store.lend(pool.regions(-(-int(need) // pool.bytes_per_token), args.run_tokens))
            out["lent_tokens"] = sum(r.numel() for r in store._regions) // pool.bytes_per_token
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        grads_lent = one_step(trainer, store)
        stats = store.stats()
        out["lent" if lent else "alone"] = {
            "saved_bytes": stats.last_micro_batch_bytes,
            "grad_bytes_lent": grads_lent,
            "peak_ordinary_bytes": stats.peak_ordinary_bytes,
            "placed_tensors": stats.placed_total,
            "cuda_peak_above_start_bytes": (torch.cuda.max_memory_allocated() - base)
            if args.device.startswith("cuda")
            else None,
        }
        store.reclaim(spill=False)
    lora = 4 * sum(p.numel() * p.element_size() for p in trainer.params)  # weights, grads, AdamW m, v
    out["lora_state_bytes"] = lora
    for name in ("alone", "lent"):
        out[name]["non_kv_bytes"] = out[name]["peak_ordinary_bytes"] + lora - out[name]["grad_bytes_lent"]
    out["non_kv_ratio"] = out["alone"]["non_kv_bytes"] / out["lent"]["non_kv_bytes"]
    return out


def fits(args, served, config, micro_batch: int, budget: int, pool: Pool | None) -> bool:
    store = ActivationStore(budget_bytes=budget)
    trainer = make_trainer(args, served, config, micro_batch, store)
    if pool is not None:
        store.lend(pool.regions(pool.tokens // 2, args.run_tokens))
    try:
        for _ in range(trainer.units_per_micro_batch):
            trainer.run_unit()
        return True
    except TrainerMemoryError:
        return False
    finally:
        store.reclaim(spill=False)


def largest_micro_batch(args, served, config, pool: Pool) -> dict:
    budget = int(args.budget_mb * 2**20)
    out = {"budget_bytes": budget, "pool_tokens": pool.tokens, "lent_tokens": pool.tokens // 2}
    for name, lent_pool in (("alone", None), ("lent", pool)):
        low, high = 0, 1
        while high <= args.max_micro_batch and fits(args, served, config, high, budget, lent_pool):
            low, high = high, high * 2
        high = min(high, args.max_micro_batch + 1)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(args, served, config, mid, budget, lent_pool) else (low, mid)
        out[name] = low
    return out


def reclaim_cost(args, served, config, pool: Pool) -> list[dict]:
    rows = []
    for lent_tokens in args.reclaim_tokens:
        for spill in (True, False):
            store = ActivationStore()
            trainer = make_trainer(args, served, config, args.micro_batch, store)
            store.lend(pool.regions(lent_tokens, args.run_tokens))
            for _ in range(len(trainer._segments)):  # halfway: every forward segment done
                trainer.run_unit()
            placed = store.stats().placed_bytes
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            store.reclaim(spill=spill)
            if not spill:
                trainer.abort_micro_batch()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rows.append(
                {
                    "lent_tokens": lent_tokens,
                    "lent_bytes": lent_tokens * pool.bytes_per_token,
                    "placed_bytes": placed,
                    "mode": "spill" if spill else "drop",
                    "ms": (time.perf_counter() - started) * 1e3,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="built-in preset (default tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pool-tokens", type=int, default=65_536, help="KV pool size (the CPU default)")
    parser.add_argument("--run-tokens", type=int, default=64, help="length of each lent run of rows")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--budget-mb", type=float, default=4.0)
    parser.add_argument("--max-micro-batch", type=int, default=256)
    parser.add_argument("--reclaim-tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/memory_cpu.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    path = materialize(args.model)
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    served = {k: v.to(args.device, dtype) for k, v in load_file(str(path / "model.safetensors")).items()}
    pool = Pool(config, args.pool_tokens, dtype, args.device)
    result = {
        "model": args.model,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "run_tokens": args.run_tokens,
        "kv_bytes_per_token": pool.bytes_per_token,
        "step_memory": step_memory(args, served, config, pool),
        "largest_micro_batch": largest_micro_batch(args, served, config, pool),
        "reclaim": reclaim_cost(args, served, config, pool),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
