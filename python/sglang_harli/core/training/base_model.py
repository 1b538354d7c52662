"""A transformers model whose frozen weights are tensors owned by someone else (the serving engine).

The trainer must not copy the base model: on a decode instance the weights are the largest thing in
memory after the KV pool. So the training model's module tree is built on the meta device (accelerate),
and every base parameter is then replaced by a frozen ``nn.Parameter`` wrapping the caller's tensor, or
a view of it, such as a row slice of a fused q/k/v matrix. Buffers (rotary frequencies) are materialised
normally, since they are small and derived from the config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


class UnboundParameterError(ValueError):
    """The caller's tensors do not cover the architecture (or do not match its shapes)."""


TensorSource = Mapping[str, torch.Tensor] | Callable[[str, torch.Size], "torch.Tensor | None"]


def build_bound_model(config: PretrainedConfig, tensors: TensorSource) -> nn.Module:
    """Build ``AutoModelForCausalLM`` for ``config`` with every parameter aliased to ``tensors[name]``.

    ``tensors`` maps Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight`` ...) to
    tensors, or is a function ``(name, expected_shape) -> tensor | None`` that finds them (the serving
    engine's fused layouts are resolved that way). Every parameter of the architecture must be present with
    the exact shape and nothing is copied: the returned model's parameters share storage with the given
    tensors, and all are frozen (``requires_grad=False``).
    """
    lookup = tensors if callable(tensors) else (lambda name, shape: tensors.get(name))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    missing, wrong = [], []
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        tensor = lookup(name, param.shape)
        if tensor is None:
            missing.append(name)
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            wrong.append(f"{name}: {tuple(tensor.shape)} != {tuple(param.shape)}")
            continue
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor.detach(), requires_grad=False))
    if missing or wrong:
        raise UnboundParameterError(
            "cannot bind the base model: "
            + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "", "; ".join(wrong[:5])]))
        )
    model.requires_grad_(False)
    return model.eval()
