"""The model: random base weights of a shape (``Base``, aliased by every model of the run), the
examples and LoRA spec trained on, the FLOPs training needs (``training_flops``), and the decode
stand-in (``Decoder``)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from benchmark.gpu.settings import ModelShape, Settings

# -- base weights, shared by every model of the run -------------------------------------------------------


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


class Base:
    """Random weights of ``shape`` on the device, held once: the trainer, the PEFT loop and the decode
    stand-in all alias them (``core.training.base_model.build_bound_model``), as the server's trainer aliases
    the engine's weights. Normal(0, 0.02) everywhere but the norms (ones), drawn on the device."""

    def __init__(self, shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.shape, self.device, self.dtype = shape, device, dtype
        self.config = llama_config(shape)
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(self.config)
        generator = torch.Generator(device=device).manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, param in meta.named_parameters():
            tensor = torch.empty(param.shape, dtype=dtype, device=device)
            if "norm" in name:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            self.tensors[name] = tensor
        del meta
        self.params = sum(t.numel() for t in self.tensors.values())

    def bound_model(self) -> torch.nn.Module:
        from sglang_harli.core.training.base_model import build_bound_model

        return build_bound_model(self.config, self.tensors).to(self.device)  # moves the rotary buffers


def make_examples(settings: Settings, count: int, seed: int) -> list:
    """Lengths uniform in [seq_min, seq_max]; the second half of each sequence is its target."""
    from sglang_harli.core.jobs.data import Example

    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n = rng.randint(settings.seq_min, settings.seq_max)
        ids = [rng.randrange(8, settings.model.vocab) for _ in range(n)]
        examples.append(Example(input_ids=ids, loss_mask=[i >= n // 2 for i in range(n)]))
    return examples


def lora_spec(settings: Settings):
    from sglang_harli.core.jobs.spec import PEFT_TARGET_MODULES, LoraSpec

    return LoraSpec(r=settings.lora_r, alpha=2.0 * settings.lora_r, target_modules=list(PEFT_TARGET_MODULES))


def training_flops(shape: ModelShape, examples: Sequence, rank: int) -> float:
    """Model FLOPs of one pass over ``examples`` (forward and backward), counting only what the training
    objective needs: the frozen base layers' forward and input gradients (no weight gradients), LoRA's
    forward, input and weight gradients on all seven projections, causal attention (half the score
    matrix; backward twice the forward), and the LM head at target positions only (forward and input
    gradient). Both sides of the comparison are scored against the same count, so work the PEFT loop
    spends on padding or on logits nobody trains on earns it nothing."""
    d, kv, inter = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    linear = 2 * d * d + 2 * d * kv + 3 * d * inter  # q, o; k, v; gate, up, down
    projections = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    lora = rank * sum(i + o for i, o in projections)
    total = 0.0
    for example in examples:
        n, targets = len(example.input_ids), sum(example.loss_mask[1:])
        forward = 2 * linear * n + 2 * lora * n + 2 * n * n * d
        backward = 2 * linear * n + 4 * lora * n + 4 * n * n * d
        total += shape.layers * (forward + backward) + 4 * d * shape.vocab * targets
    return total


# -- the decode stand-in ----------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Decoder:
    """A LLaMA decode step over ``Base``'s weights with a static KV cache: what SGLang's decode forward
    does per step (every layer's projections, attention over each request's cached keys and values, the
    LM head and a greedy sample), without its paging, fused kernels or scheduler.

    The cache is ``[layers, max_batch, max_context, kv_heads, head_dim]`` for keys and for values, filled
    with random numbers (never time on zeros). A step of ``(batch, context)`` writes the new token's keys
    and values at position ``context - 1`` of each request and attends over positions ``[0, context)``;
    grouped-query attention is one SDPA call with each KV head's query heads as its rows. Each
    ``(batch, context)`` gets its own CUDA graph (SGLang captures one per batch size; here the context is
    fixed per graph too, so attention reads a static slice); where capture fails the step runs eagerly and
    ``mode`` says why.
    """

    def __init__(self, base: Base, *, max_batch: int, max_context: int, graphs: bool = True, seed: int = 0):
        shape, tensors = base.shape, base.tensors
        self.shape, self.device, self.dtype = shape, base.device, base.dtype
        self.eps = float(base.config.rms_norm_eps)
        self.max_batch, self.max_context = max_batch, max_context
        self.layers = []
        for i in range(shape.layers):
            p = f"model.layers.{i}."
            self.layers.append(
                tuple(
                    tensors[p + name + ".weight"]
                    for name in (
                        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                        "mlp.down_proj",
                    )
                )
            )  # fmt: skip
        self.embed = tensors["model.embed_tokens.weight"]
        self.norm = tensors["model.norm.weight"]
        self.head = tensors["lm_head.weight"]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = (shape.layers, max_batch, max_context, shape.kv_heads, shape.head_dim)
        self.keys = torch.empty(cache, dtype=self.dtype, device=self.device).normal_(generator=generator)
        self.values = torch.empty(cache, dtype=self.dtype, device=self.device).normal_(generator=generator)
        self.ids = torch.randint(8, shape.vocab, (max_batch,), device=self.device, generator=generator)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self._rotary = LlamaRotaryEmbedding(config=base.config).to(self.device)
        self.cuda = self.device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.capture_failure: str | None = None
        self._runners: dict[tuple[int, int], Callable[[], Any]] = {}
        self._keep: list[Any] = []
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @property
    def mode(self) -> str:
        if not self.cuda:
            return f"eager ({self.device.type})"
        if not self.graphs:
            return "eager (graphs off)"
        if self.capture_failure:
            return f"eager (CUDA graph capture failed: {self.capture_failure})"
        return "CUDA graph per (batch, context)"

    def rope(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        positions = torch.tensor([[position]], device=self.device)
        cos, sin = self._rotary(probe, positions)
        return cos.reshape(-1), sin.reshape(-1)

    @torch.no_grad()
    def forward(self, batch: int, context: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One step for requests ``[0, batch)`` at ``context`` tokens each; returns the logits."""
        shape = self.shape
        heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
        position = context - 1
        x = F.embedding(self.ids[:batch], self.embed)
        for layer, (w_in, wq, wk, wv, wo, w_post, w_gate, w_up, w_down) in enumerate(self.layers):
            h = _rms(x, w_in, self.eps)
            q = _rotate(F.linear(h, wq).view(batch, heads, head_dim), cos, sin)
            k = _rotate(F.linear(h, wk).view(batch, kv_heads, head_dim), cos, sin)
            self.keys[layer, :batch, position].copy_(k)
            self.values[layer, :batch, position].copy_(F.linear(h, wv).view(batch, kv_heads, head_dim))
            keys = self.keys[layer, :batch, :context].transpose(1, 2)  # [batch, kv_heads, context, dim]
            values = self.values[layer, :batch, :context].transpose(1, 2)
            rows = q.view(batch, kv_heads, heads // kv_heads, head_dim)
            attention = F.scaled_dot_product_attention(rows, keys, values)
            x = x + F.linear(attention.reshape(batch, heads * head_dim), wo)
            h = _rms(x, w_post, self.eps)
            x = x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
        logits = F.linear(_rms(x, self.norm, self.eps), self.head)
        self.ids[:batch].copy_(logits.argmax(-1))
        return logits

    def runner(self, batch: int, context: int) -> Callable[[], Any]:
        """The step of ``(batch, context)``: a graph replay where capture works, else the eager forward."""
        if not (0 < batch <= self.max_batch and 0 < context <= self.max_context):
            raise ValueError(
                f"step ({batch}, {context}) outside the cache ({self.max_batch}, {self.max_context})"
            )
        key = (batch, context)
        if key in self._runners:
            return self._runners[key]
        cos, sin = self.rope(context - 1)

        def eager() -> None:
            self.forward(batch, context, cos, sin)

        run: Callable[[], Any] = eager
        if self.graphs and self.capture_failure is None:
            try:
                run = self._capture(eager)
            except Exception as exc:  # eager still measures the step, with launch overhead, and says so
                self.capture_failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device)
        self._runners[key] = run
        self._keep.append((cos, sin))
        return run

    def _capture(self, eager: Callable[[], None]) -> Callable[[], Any]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, SDPA kernels
            eager()
            eager()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            eager()
        self._keep.append(graph)
        return graph.replay

    def bytes_per_step(self, batch: int, context: int) -> int:
        """What a step must read at least: every weight but the embedding table (a row per request),
        and each request's keys and values over its context."""
        element = self.embed.element_size()
        weights = (
            sum(t.numel() for layer in self.layers for t in layer) + self.norm.numel() + self.head.numel()
        )
        kv = batch * context * self.shape.layers * 2 * self.shape.kv_heads * self.shape.head_dim
        return (weights + kv + batch * self.shape.hidden) * element
