"""``python -m benchmark.gpu``: GPU co-location and trainer MFU, one command for one lent H200.

Parts, each on its own (a part that fails is recorded as failed with its error, and the others still run
and report); every figure goes to ``<out>/gpu.json`` after each part, the log to ``<out>/gpu.log``, and a
table is printed at the end:

- ``ceilings``: the device's measured bf16 matmul peak (large square products, random data, CUDA events
  after warm-up) and HBM bandwidth (a large device-to-device copy, bytes read plus bytes written).
- ``trainer``: ``core.training.trainer.LoraTrainer`` over a randomly initialised bf16 model of the LLaMA3-8B
shape
  (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128256; built from a
  transformers ``LlamaConfig``), LoRA r=16 on all seven projections, sequences of 1,024-2,048 tokens,
  beside the plain transformers + PEFT loop of ``benchmark.train_throughput`` on the same weights and
  examples: tokens/s and MFU against the measured peak (FLOPs counted in ``training_flops``).
- ``decode``: a decode stand-in of the same model (``Decoder``: the model's own weights, a static KV
  cache, one CUDA graph per batch and context, as SGLang captures one per batch size; eager where capture
  fails, and the table says so): step latency by batch and context.
- ``corun``: for every split of the partition menu (``core.colocation.partition.make_partitioner``, ``shared``
  included), the decode step alone and with trainer units running in the split
  (``Partitioner.finetune``): latency inflation, finetune tokens/s, and the MAPE of
  ``core.colocation.predictor.LatencyPredictor`` fed with those observations, solo and co-run per split.
- ``replay``: a bursty trace (60 s, 30 s with ``--quick``) replayed on the stand-in for each policy
  (``harli``, ``idle-only``, ``naive``, ``static`` tuned once for the trace's peak, and where the menu has
  SM partitions ``fixed-split``, MPS-style, tuned likewise) through the real
  ``core.colocation.loop.CoLocation`` (``admit``, ``unit_done``, ``decode_done``, ``idle``, as the server
  calls them): SLO attainment, TPOT p50/p99 and finetune tokens/s, and harli's gain over the best
  baseline that holds the SLO.

Without CUDA, or with ``--smoke``, the same code runs at a tiny shape (2 layers, hidden 64, vocabulary
512, short sequences, a few steps, the ``shared`` split only, host clocks for timing) in well under a
minute on two cores: ``test/test_gpu_benchmark.py`` runs it so this package cannot rot.

This package imports no SGLang, and nothing but torch at import time: ``ceilings`` runs on a bare torch,
and the other parts import ``sglang_harli.core`` (which needs msgspec) when they start. The GPU machine
has torch, transformers, peft, accelerate and triton but no msgspec and no network, so msgspec travels
as a wheel. Once, here, in the repository root (pip needs the network)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl msgspec==0.23.0

Then, on a lent H200, through the device tool's ``run`` (estimated at about 7.5 minutes of device time;
``--quick`` 4.5), with ``carry: [".whl"]`` and ``timeout_s: 570``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/python || exit; set -o pipefail;
    PYTHONUNBUFFERED=1 python3 -m benchmark.run --only gpu --out $OUT --no-results-md 2>&1 | tee $OUT/run.log

(one line). Back here, ``python -m benchmark.run --merge /work/.device/.../run.json`` records the part in
``benchmark/results/run.json`` and ``RESULTS.md`` (``benchmark/README.md``, "GPU benchmark").

- ``settings``: the parts, the policies, the model shapes and each mode's ``Settings`` (``make_settings``);
- ``device``: ``Run``, what the parts share (the device, the log, the results, the base weights, the menu);
- ``model``: the random base weights (``Base``), examples, LoRA spec, ``training_flops`` and the decode
  stand-in (``Decoder``);
- ``colocated``: finetune units beside a decode step, one token interval (``Colocated``);
- ``ceilings``, ``trainer``, ``decode``, ``corun``, ``replay``: one part each (``part_<name>``);
- ``tables``: the markdown tables printed at the end;
- ``summary``: the part's targets, table and notes for ``benchmark.run`` (imports msgspec: not imported
  here);
- ``__main__``: the command line (``run_parts``).

    python -m benchmark.gpu                  # full, on CUDA
    python -m benchmark.gpu --quick          # fewer cells, 30 s replays
    python -m benchmark.gpu --smoke          # the tiny CPU shape (automatic without CUDA)
    python -m benchmark.gpu --only ceilings,decode --out /tmp/gpu
"""

from benchmark.gpu.colocated import Colocated, Interval, colocated_trainer
from benchmark.gpu.device import Run, describe_device
from benchmark.gpu.model import Base, Decoder, llama_config, lora_spec, make_examples, training_flops
from benchmark.gpu.settings import (
    GIB,
    LLAMA3_8B,
    PARTS,
    POLICIES,
    SPATIAL,
    TINY,
    ModelShape,
    Settings,
    make_settings,
)
from benchmark.gpu.tables import tables

__all__ = [
    "GIB",
    "LLAMA3_8B",
    "PARTS",
    "POLICIES",
    "SPATIAL",
    "TINY",
    "Base",
    "Colocated",
    "Decoder",
    "Interval",
    "ModelShape",
    "Run",
    "Settings",
    "colocated_trainer",
    "describe_device",
    "llama_config",
    "lora_spec",
    "make_examples",
    "make_settings",
    "tables",
    "training_flops",
]
