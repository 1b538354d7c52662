"""LoRA training over a tensor-parallel base model: every rank trains the slice of the adapter that sits
beside its slice of the served weights.

A serving engine with ``--tp-size N`` splits each decoder layer Megatron-style: q/k/v and gate/up are
*column*-parallel (each rank holds a block of output features: its attention heads, its share of the MLP),
o_proj and down_proj are *row*-parallel (each rank holds the matching block of input features, and the
ranks' partial outputs are summed), and the vocabulary is split for the embedding and the LM head. The
training model is built over those slices (``local_config``), so nothing is gathered or copied, and the
adapter follows the same split:

- on a column-parallel projection, ``lora_B`` (out x r) is split by rows and ``lora_A`` is replicated;
- on a row-parallel projection, ``lora_A`` (r x in) is split by columns and ``lora_B`` is replicated,
  and the LoRA term joins the base term *before* the ranks' outputs are summed.

The collectives are the ones that split needs and nothing else: the input of every column-parallel block
(attention, MLP, LM head) is summed over ranks in backward; the output of every row-parallel projection
is summed in forward; the embedding's partial lookups are summed; the LM head's logits are gathered so
every rank computes the same loss. Gradients of replicated LoRA weights are partial sums and are summed
before the optimizer step, so every rank takes the same step, and the global gradient norm counts each
split weight once. The result equals training on one rank, up to the order of floating-point sums.

The adapter's initial values are those a one-rank run draws (PEFT's init from the job's seed, on the full
shapes), sliced; and the adapter written to disk is the gathered full one, in plain PEFT format.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch import nn

from sglang_harli.core.training.base_model import build_bound_model

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class _SumGradsOverRanks(torch.autograd.Function):
    """Identity forward; the gradient is summed over ranks (the input of a column-parallel block)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """Sum forward (the partial outputs of a row-parallel projection); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Concatenate every rank's slice along the last dimension; backward hands each rank its slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=-1)[ctx.rank].contiguous(), None


class TensorParallelError(ValueError):
    """The model cannot be trained with this tensor-parallel size."""


class TensorParallel:
    """One rank's view of a tensor-parallel group, for training (see the module docstring).

    ``vocab_start`` and ``vocab_rows``: the first token id of this rank's slice of the (padded)
    vocabulary and how many rows its embedding holds; ``vocab_size``: the real vocabulary.
    """

    def __init__(self, group, *, vocab_start: int, vocab_rows: int, vocab_size: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.vocab_start, self.vocab_rows, self.vocab_size = vocab_start, vocab_rows, vocab_size
        self.full_config = None  # set by local_config

    # -- the model -----------------------------------------------------------------------------------
    def local_config(self, config):
        """``config`` with this rank's share of heads, MLP width and vocabulary."""
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        for what, count in (
            ("attention heads", heads),
            ("key/value heads", kv_heads),
            ("intermediate size", config.intermediate_size),
        ):
            if count % self.size:
                raise TensorParallelError(
                    f"training with --tp-size {self.size} needs the {what} ({count}) to divide evenly; "
                    "replicated key/value heads are not supported for training"
                )
        self.full_config = config
        local = copy.deepcopy(config)
        local.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        local.num_attention_heads = heads // self.size
        local.num_key_value_heads = kv_heads // self.size
        local.intermediate_size = config.intermediate_size // self.size
        local.vocab_size = self.vocab_rows
        return local

    def install(self, model: nn.Module) -> None:
        """Add the collectives to a (PEFT-wrapped) model built from ``local_config``."""
        group = self.group
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = causal_lm.get_decoder()
        for layer in decoder.layers:
            for block in (layer.self_attn, layer.mlp):
                block.register_forward_pre_hook(self._copy_input, with_kwargs=True)
            for name in ROW_PARALLEL:
                owner = layer.self_attn if name == "o_proj" else layer.mlp
                getattr(owner, name).register_forward_hook(
                    lambda m, args, out: _SumOverRanks.apply(out, group)
                )
        decoder.embed_tokens.register_forward_pre_hook(self._local_ids)
        decoder.embed_tokens.register_forward_hook(self._sum_lookups)
        lm_head = causal_lm.get_output_embeddings()
        lm_head.register_forward_pre_hook(self._copy_input, with_kwargs=True)
        lm_head.register_forward_hook(self._gather_logits)

    def _copy_input(self, module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {
                **kwargs,
                "hidden_states": _SumGradsOverRanks.apply(kwargs["hidden_states"], self.group),
            }
        else:
            args = (_SumGradsOverRanks.apply(args[0], self.group), *args[1:])
        return args, kwargs

    def _local_ids(self, module, args):
        ids = args[0]
        module._harli_tp_mask = (ids >= self.vocab_start) & (ids < self.vocab_start + self.vocab_rows)
        return ((ids - self.vocab_start) * module._harli_tp_mask,)

    def _sum_lookups(self, module, args, out):
        out = out * module._harli_tp_mask.unsqueeze(-1).to(out.dtype)
        del module._harli_tp_mask
        return _SumOverRanks.apply(out, self.group)

    def _gather_logits(self, module, args, out):
        return _GatherLastDim.apply(out, self.group)[..., : self.vocab_size]

    # -- the adapter ---------------------------------------------------------------------------------
    def split_of(self, name: str) -> int | None:
        """The dimension along which LoRA weight ``name`` is split across ranks; None: replicated."""
        parts = name.split(".")
        if "lora_A" in parts:
            leaf = parts[parts.index("lora_A") - 1]
            return 1 if leaf in ROW_PARALLEL else None
        if "lora_B" in parts:
            leaf = parts[parts.index("lora_B") - 1]
            return 0 if leaf in COLUMN_PARALLEL else None
        return None

    def initial_adapter(self, lora_config, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The LoRA weights a one-rank run starts from: PEFT's own init on the full shapes, same seed.

        The full model is a skeleton whose base weights are single zeros broadcast to their shapes (no
        memory), since PEFT draws the adapter's values from the RNG in module order and shape."""

        def zeros(name, shape):
            return torch.zeros((), dtype=dtype).expand(shape)

        skeleton = build_bound_model(self.full_config, zeros)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(skeleton, lora_config)
        return {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}

    def load_slices(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Set each trainable LoRA weight of ``model`` to this rank's slice of ``full``."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(self._slice(name, full[name]))

    def _slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dim = self.split_of(name)
        return tensor if dim is None else tensor.chunk(self.size, dim=dim)[self.rank]

    def reduce_grads(self, params: list[tuple[str, nn.Parameter]]) -> None:
        """Sum the partial gradients of the replicated LoRA weights over ranks, in one collective."""
        grads = [p.grad for name, p in params if p.grad is not None and self.split_of(name) is None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def clip_grad_norm_(self, params: list[tuple[str, nn.Parameter]], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole adapter, each split weight counted once."""
        device = params[0][1].device
        split = torch.zeros((), dtype=torch.float64, device=device)
        replicated = torch.zeros((), dtype=torch.float64, device=device)
        for name, p in params:
            if p.grad is None:
                continue
            square = p.grad.detach().double().pow(2).sum()
            if self.split_of(name) is None:
                replicated += square
            else:
                split += square
        dist.all_reduce(split, group=self.group)
        norm = (split + replicated).sqrt().float()
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for _, p in params:
            if p.grad is not None:
                p.grad.mul_(coefficient.to(p.grad.dtype))
        return norm

    def gathered(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full adapter (every rank takes part; every rank gets it)."""
        full = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            dim = self.split_of(name)
            if dim is None:
                full[name] = param.detach().clone()
                continue
            parts = [torch.empty_like(param) for _ in range(self.size)]
            dist.all_gather(parts, param.detach().contiguous(), group=self.group)
            full[name] = torch.cat(parts, dim=dim)
        return full
