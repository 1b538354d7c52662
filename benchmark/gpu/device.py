"""The run: what the parts share (``Run``: the device, the log, the results so far, the base weights
built once, the partition menu) and the device's description."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmark.gpu.model import Base
from benchmark.gpu.settings import GIB, Settings


class Run:
    """What the parts share: the device, the log, the results so far, and the base weights (built once)."""

    def __init__(self, settings: Settings, device: torch.device, out: Path, command: str):
        self.settings, self.device, self.out = settings, device, out
        self.cuda = device.type == "cuda"
        self.dtype = getattr(torch, settings.dtype)
        out.mkdir(parents=True, exist_ok=True)
        self._log = (out / "gpu.log").open("a")
        self.result: dict[str, Any] = {
            "mode": settings.mode,
            "command": command,
            "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": describe_device(device),
            "settings": dataclasses.asdict(settings),
            "parts": {},
        }
        self._base: Base | None = None
        self._partitioner = None
        self.decode_stream = torch.cuda.Stream(device) if self.cuda else None

    def log(self, line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        self._log.write(stamped + "\n")
        self._log.flush()

    def save(self) -> Path:
        path = self.out / "gpu.json"
        path.write_text(json.dumps(self.result, indent=1, default=_json_default) + "\n")
        return path

    def base(self) -> Base:
        if self._base is None:
            started = time.perf_counter()
            self._base = Base(self.settings.model, self.device, self.dtype, self.settings.seed)
            self.log(
                f"base weights: {self.settings.model.name}, {self._base.params / 1e9:.2f}B params "
                f"{self.settings.dtype} on {self.device} ({time.perf_counter() - started:.1f} s)"
            )
        return self._base

    def partitioner(self):
        """The server's menu (``make_partitioner``); the smoke keeps only ``shared``."""
        if self._partitioner is None:
            from sglang_harli.core.colocation.partition import make_partitioner

            self._partitioner = make_partitioner(self.device)
            self._partitioner.prepare()
            self.log(f"partitions: {self._partitioner.describe()}")
        return self._partitioner

    def menu(self):
        splits = self.partitioner().splits
        return splits if self.settings.all_splits else splits[:1]

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_calls(self, fn: Callable[[], Any], reps: int, warmup: int = 3) -> list[float]:
        """Seconds of each of ``reps`` calls after ``warmup``: CUDA events on the current stream (one
        wait at the end), the host clock on a CPU."""
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return times
        pairs = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        self.sync()
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]

    def peak_flops(self) -> float | None:
        ceilings = self.result["parts"].get("ceilings", {})
        tflops = ceilings.get("matmul_tflops") if ceilings.get("status") == "ok" else None
        return None if tflops is None else tflops * 1e12

    def bandwidth(self) -> float | None:
        ceilings = self.result["parts"].get("ceilings", {})
        gbps = ceilings.get("copy_gbps") if ceilings.get("status") == "ok" else None
        return None if gbps is None else gbps * 1e9


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
    }
    for package in ("transformers", "peft", "accelerate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / GIB,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    else:
        info["name"] = "CPU"
    return info


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "__struct_fields__"):  # a msgspec struct from core
        return {f: getattr(value, f) for f in value.__struct_fields__}
    return str(value)
