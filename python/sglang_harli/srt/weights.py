"""Bind a transformers training model to the weights SGLang serves, without copying them.

SGLang fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (rows stacked in that order), wraps
LoRA-served layers in a module whose ``base_layer`` holds the weight, and drops ``lm_head`` when it is tied
to the embedding. Each Hugging Face parameter is therefore found as the same-named tensor, a row slice of
the fused one (``narrow`` is a view), or the embedding. Row slices are contiguous, so the views share the
served storage exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig

from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.tensor_parallel import TensorParallel

_FUSED = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
}


def served_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """SGLang's parameters by name, with LoRA wrappers' ``base_layer`` hop removed."""
    named = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named.setdefault(name.replace(".base_layer.", "."), param)
    return named


class ServedWeightResolver:
    """``(hf_name, shape) -> view of a served tensor`` for :func:`build_bound_model`."""

    def __init__(self, served: dict[str, torch.Tensor], tie_word_embeddings: bool):
        self.served = served
        self.tie_word_embeddings = tie_word_embeddings
        self._shapes: dict[str, torch.Size] = {}

    def __call__(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        self._shapes[name] = shape
        tensor = self.served.get(name)
        if tensor is None and name == "lm_head.weight" and self.tie_word_embeddings:
            tensor = self.served.get("model.embed_tokens.weight")
        if tensor is None:
            tensor = self._fused_slice(name, shape)
        if tensor is not None and tensor.shape != shape and tensor.shape[1:] == shape[1:]:
            tensor = tensor.narrow(0, 0, shape[0])  # vocabulary padded to a multiple by SGLang
        return tensor

    def _fused_slice(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        module_path, _, attr = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf not in _FUSED:
            return None
        fused_leaf, order = _FUSED[leaf]
        fused = self.served.get(f"{parent}.{fused_leaf}.{attr}")
        if fused is None:
            return None
        offset = 0
        for part in order:
            rows = self._rows_of(f"{parent}.{part}.{attr}", fused)
            if part == leaf:
                return fused.narrow(0, offset, shape[0])
            offset += rows
        return None

    def _rows_of(self, name: str, fused: torch.Tensor) -> int:
        """Rows of an earlier part of a fused tensor. Shapes are learnt as the model is walked in order;
        q, k, v (and gate, up) are declared in that order in every supported architecture."""
        shape = self._shapes.get(name)
        if shape is not None:
            return shape[0]
        raise LookupError(f"cannot place {name} in its fused tensor of shape {tuple(fused.shape)}")


def bind_training_model(
    served_model: nn.Module, model_path: str, tensor_parallel: TensorParallel | None = None
) -> tuple[nn.Module, dict[str, int]]:
    """A frozen transformers model over ``served_model``'s storage, and a count proving nothing was copied.

    With ``tensor_parallel``, the served model is this rank's slice and so is the training model."""
    config = AutoConfig.from_pretrained(model_path)
    if tensor_parallel is not None:
        config = tensor_parallel.local_config(config)
    served = served_parameters(served_model)
    model = build_bound_model(
        config, ServedWeightResolver(served, bool(getattr(config, "tie_word_embeddings", False)))
    )
    served_storage = {t.untyped_storage().data_ptr() for t in served.values()}
    params = list(model.parameters())
    shared = sum(1 for p in params if p.untyped_storage().data_ptr() in served_storage)
    return model, {"params": len(params), "shared_with_server": shared}
