"""``LoraModel``: a LoRA adapter over a frozen base model, run a few decoder layers at a time.

The base of every trainer in this package (``core.training.trainer``'s ``LoraTrainer`` for finetune jobs,
``core.tinker.trainer``'s ``TinkerTrainer`` for the Tinker API), which differ in what they train on and
when they step, not in how a unit of work runs.

Layer-wise units work by cutting the autograd graph at layer boundaries: each forward segment starts from
a detached copy of the previous segment's output, and each backward segment hands the gradient of its
input to the segment before it. The layers are called exactly as the model's own forward calls them (the
arguments are recorded from one pass of the model with its layers short-circuited), so masks, rotary
embeddings and per-layer attention types stay the model's business.

Every tensor autograd saves in a forward can be routed through ``saved_tensor_hooks`` (pack, unpack):
that is where memory lending places activations in borrowed KV-cache pages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from sglang_harli.core.colocation.work import FinetuneWork
from sglang_harli.core.jobs.spec import LoraSpec
from sglang_harli.core.training.tensor_parallel import TensorParallel

MAX_LOSS_CHUNKS = 16
"""The most units one micro-batch's loss is cut into."""
SavedTensorHooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


def lora_config(spec: LoraSpec) -> LoraConfig:
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return LoraConfig(
        r=spec.r,
        lora_alpha=alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def training_mode():
    """Autograd on, even inside an inference-mode serving loop."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


class LoraModel:
    """A LoRA adapter over ``base_model`` (frozen, not owned), run in segments of decoder layers.

    What every trainer of this package shares: the PEFT model drawn with a seed, the layers cut into
    segments (one unit of work each), the arguments the model's own forward passes each layer, the final
    norm and head, and the adapter's weights and files. What a trainer trains on, and when it steps, is
    the subclass's: ``LoraTrainer`` runs a planned supervised run, ``core.tinker.trainer`` the requests of
    the Tinker API."""

    def __init__(
        self,
        base_model: nn.Module,
        lora: LoraSpec,
        seed: int,
        *,
        layers_per_unit: int | None = None,
        saved_tensor_hooks: SavedTensorHooks | None = None,
        tensor_parallel: TensorParallel | None = None,
    ):
        if layers_per_unit is not None and layers_per_unit < 1:
            raise ValueError("layers_per_unit must be at least 1")
        self.lora = lora
        self.saved_tensor_hooks = saved_tensor_hooks
        self.device = next(base_model.parameters()).device
        # With tensor parallelism, ``base_model`` is this rank's slice (``core.training.tensor_parallel``).
        self.tensor_parallel = tp = tensor_parallel
        with training_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)  # LoRA A init, as `torch.manual_seed(seed); get_peft_model` does
            self.model: PeftModel = get_peft_model(base_model, lora_config(lora))
            if tp is not None:  # the slices of what one rank would have drawn
                dtype = next(base_model.parameters()).dtype
                tp.load_slices(self.model, tp.initial_adapter(lora_config(lora), seed, dtype))
                tp.install(self.model)
            self.model.train()
            self._named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.params = [p for _, p in self._named_params]
        causal_lm = self.model.get_base_model()
        self._decoder = causal_lm.get_decoder()
        self._lm_head = causal_lm.get_output_embeddings()
        layers = len(self._decoder.layers)
        per_unit = min(layers_per_unit or layers, layers)
        self._segments = [range(i, min(i + per_unit, layers)) for i in range(0, layers, per_unit)]
        self._trainable = sum(p.numel() for p in self.params)
        self.loss_chunks = 1
        """Units the loss of a micro-batch is cut into (``head_chunks``; a subclass sets it)."""

    def head_chunks(self) -> int:
        """Loss units per micro-batch such that each costs about one forward segment: the LM head's
        weights over a segment's (its matmuls per token), at most ``MAX_LOSS_CHUNKS``. On a model whose
        vocabulary dwarfs a layer (SmolLM2-135M: 28M head weights, 3.5M per layer) one loss unit would be
        the longest wait a request arriving during training has before its prefill runs; cut by rows,
        each chunk is a few milliseconds. Fixed by the model's shape, never by timing, so a resumed run
        cuts the same way and stays bit for bit."""
        tp, weight = self.tensor_parallel, self._lm_head.weight
        # Whole-model figures, so that every tensor-parallel rank (whose vocabulary slices may differ by
        # a row) cuts the same way: the full vocabulary, and a segment's slice times the ranks.
        head = weight.shape[-1] * (tp.vocab_size if tp is not None else weight.shape[0])
        layers = self._segments[0]
        segment = sum(p.numel() for i in layers for p in self._decoder.layers[i].parameters())
        segment *= tp.size if tp is not None else 1
        return max(1, min(MAX_LOSS_CHUNKS, -(-head // max(segment, 1))))

    def _saving(self):
        if self.saved_tensor_hooks is None:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(*self.saved_tensor_hooks)

    def record_layer_calls(self, **decoder_kwargs) -> tuple[list[tuple[tuple, dict]], torch.Tensor]:
        """One pass of the decoder with its layers short-circuited: the arguments the model's own forward
        passes each layer (masks, rotary embeddings, a KV cache), and the first layer's input."""
        calls: list[tuple[tuple, dict]] = []
        inputs: list[torch.Tensor] = []

        def record(hidden_states, *args, **kwargs):
            inputs.append(hidden_states)
            calls.append((args, kwargs))
            return hidden_states

        layers = list(self._decoder.layers)
        for layer in layers:  # an instance attribute shadows the class's forward for this one pass
            layer.forward = record
        try:
            with torch.no_grad():
                self._decoder(**decoder_kwargs)
        finally:
            for layer in layers:
                del layer.forward
        if len(calls) != len(layers):
            raise RuntimeError(f"the decoder called {len(calls)} of its {len(layers)} layers")
        return calls, inputs[0]

    def run_layers(self, segment: int, hidden: torch.Tensor, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        """Decoder layers of ``segment`` on ``hidden`` without autograd (evaluation)."""
        with torch.no_grad():
            return self._layers(segment, hidden, calls)

    def _layers(self, segment: int, hidden: torch.Tensor, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        """Decoder layers of ``segment``, each called with the arguments the model's forward gave it."""
        for layer_index in self._segments[segment]:
            args, kwargs = calls[layer_index]
            hidden = self._decoder.layers[layer_index](hidden, *args, **kwargs)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (logits in float32), without autograd (evaluation)."""
        with torch.no_grad():
            logits = self._lm_head(self._decoder.norm(hidden))
        return logits.float()

    @property
    def segments(self) -> int:
        """Forward (or backward) units per micro-batch."""
        return len(self._segments)

    def segment_layers(self, segment: int) -> int:
        return len(self._segments[segment])

    @property
    def units_per_micro_batch(self) -> int:
        """A micro-batch's forward segments, its loss chunks and its backward segments."""
        return 2 * len(self._segments) + self.loss_chunks

    def _unit_work(self, unit: int, per_micro: int, tokens: int) -> FinetuneWork:
        """Unit ``unit`` of a micro-batch of ``tokens`` that takes ``per_micro`` units: the forward
        segments, then the loss (in ``loss_chunks`` units, each with its share of the tokens), then the
        backward segments in reverse."""
        segments = len(self._segments)
        if unit < segments:
            return FinetuneWork(kind="forward", tokens=tokens, layers=len(self._segments[unit]))
        if unit < segments + self.loss_chunks:  # the tokens shared out as the rows are
            share, extra = divmod(tokens, self.loss_chunks)
            return FinetuneWork(kind="loss", tokens=share + (unit - segments < extra))
        return FinetuneWork(kind="backward", tokens=tokens, layers=len(self._segments[per_micro - 1 - unit]))

    @staticmethod
    def _backward_through(flight, index: int) -> None:
        """Backward segment ``index`` of the micro-batch in flight: the gradient of its output (in
        ``flight.hidden``) through its layers, leaving the gradient of its input for the segment before."""
        hidden, output = flight.segments.pop()
        assert len(flight.segments) == index
        torch.autograd.backward(output, flight.hidden)
        flight.hidden = hidden.grad if index > 0 else None

    def load_lora_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the LoRA weights (e.g. the best eval's snapshot, before publishing it)."""
        named = dict(self._named_params)
        with torch.no_grad():
            for name, tensor in weights.items():
                named[name].copy_(tensor)

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    # -- results -------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | None) -> None:
        """Write the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

        With tensor parallelism every rank must call this (the adapter is gathered); one of them passes
        the ``directory``, the others ``None``."""
        if self.tensor_parallel is None:
            self.model.save_pretrained(directory, safe_serialization=True)
            return
        full = self.tensor_parallel.gathered(self.model)
        if directory is not None:
            self.model.save_pretrained(
                directory, safe_serialization=True, state_dict=full, save_embedding_layers=False
            )

    def lora_state(self) -> dict[str, torch.Tensor]:
        """This rank's LoRA weights (with tensor parallelism, its slices)."""
        return {n: p.detach() for n, p in self._named_params}
