"""The ``decode`` part: the stand-in's step latency by batch and context, against the copy bandwidth."""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import torch

from benchmark.gpu.device import Run
from benchmark.gpu.model import Decoder
from benchmark.gpu.settings import GIB


def part_decode(run: Run) -> dict[str, Any]:
    s = run.settings
    base = run.base()
    bandwidth = run.bandwidth()
    rows, modes = [], set()
    element = base.tensors["lm_head.weight"].element_size()
    kv_per_token = s.model.layers * 2 * s.model.kv_heads * s.model.head_dim * element
    for context in s.decode_contexts:
        for batch in s.decode_batches:
            row: dict[str, Any] = {"batch": batch, "context": context}
            need = batch * context * kv_per_token
            if run.cuda:
                free, _ = torch.cuda.mem_get_info(run.device)
                if need > free - 8 * GIB:
                    row["skipped"] = f"KV cache needs {need / GIB:.0f} GiB, {free / GIB:.0f} GiB free"
                    rows.append(row)
                    run.log(f"decode batch {batch} context {context}: skipped ({row['skipped']})")
                    continue
            decoder = Decoder(base, max_batch=batch, max_context=context, seed=s.seed)
            stream = run.decode_stream
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                step = decoder.runner(batch, context)
                times = run.time_calls(step, s.decode_steps, warmup=3)
            modes.add(decoder.mode)
            step_s = statistics.median(times)
            moved = decoder.bytes_per_step(batch, context)
            row.update(
                mode=decoder.mode,
                step_ms=step_s * 1e3,
                p90_ms=sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
                bytes=moved,
                achieved_gbps=moved / step_s / 1e9,
                bandwidth_share=moved / step_s / bandwidth if bandwidth else None,
            )
            rows.append(row)
            run.log(f"decode batch {batch} context {context}: {step_s * 1e3:.3f} ms ({decoder.mode})")
            del decoder, step
            run.free()
    return {"rows": rows, "modes": sorted(modes)}
