"""The base model aliases weights it does not own, and PEFT on it computes what plain PEFT does."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from sglang_harli.core.training.base_model import UnboundParameterError, build_bound_model
from sglang_harli.models.builtin import materialize

LORA = dict(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False
)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_bound_model_shares_storage_and_matches_peft(preset):
    path = materialize(preset)
    config = AutoConfig.from_pretrained(path)
    served = load_file(str(path / "model.safetensors"))  # stands in for the serving engine's tensors
    bound = build_bound_model(config, served)

    for name, param in bound.named_parameters():
        assert not param.requires_grad
        assert param.data_ptr() == served[name].data_ptr(), name  # aliased, not copied

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    ours = get_peft_model(bound, LoraConfig(**LORA))
    torch.manual_seed(0)
    theirs = get_peft_model(reference, LoraConfig(**LORA))

    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_ours = ours(input_ids=ids, labels=ids).loss
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=0, atol=1e-6)
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys() and grads_ours
    for name, grad in grads_ours.items():
        torch.testing.assert_close(grad, grads_theirs[name], rtol=1e-5, atol=1e-7)
    for name, tensor in served.items():  # training never wrote into the served weights
        assert tensor.grad is None, name


def test_bound_model_rejects_incomplete_tensors():
    path = materialize("tiny")
    served = load_file(str(path / "model.safetensors"))
    served.pop("lm_head.weight")
    with pytest.raises(UnboundParameterError, match="lm_head.weight"):
        build_bound_model(AutoConfig.from_pretrained(path), served)
