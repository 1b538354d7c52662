"""``TinkerTrainer`` (``core.tinker.trainer``) against plain PyTorch + PEFT on the built-in tiny model:
the same target-token logprobs, the same summed loss and gradients for cross_entropy and
importance_sampling, whatever the micro-batch and segment cuts; forward_only leaves the gradients alone;
optim_step applies AdamW with the given parameters; a loop of forward_backward and optim_step learns."""

import numpy as np
import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from sglang_harli.core.jobs.spec import LoraSpec
from sglang_harli.core.tinker.codec import Datum, ForwardBackward
from sglang_harli.core.tinker.params import AdamParams
from sglang_harli.core.tinker.trainer import TinkerTrainer
from sglang_harli.core.training.lora import lora_config
from sglang_harli.models.builtin import materialize

LORA = LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
SEED = 7


def _base():
    return AutoModelForCausalLM.from_pretrained(materialize("tiny"), dtype=torch.float32)


def _datums(count=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(4, 12))
        tokens = rng.integers(3, 200, size=length + 1)
        out.append(
            Datum(
                tokens=tokens[:-1].astype(np.int64),
                inputs={
                    "target_tokens": tokens[1:].astype(np.int64),
                    "weights": rng.uniform(0, 1, size=length).astype(np.float32),
                    "logprobs": rng.uniform(-6, -1, size=length).astype(np.float32),
                    "advantages": rng.normal(size=length).astype(np.float32),
                },
            )
        )
    return out


def _request(datums, loss_fn="cross_entropy", forward_only=False):
    return ForwardBackward(
        model_id="m", seq_id=1, loss_fn=loss_fn, forward_only=forward_only, config={}, data=datums
    )


def _run(trainer, request):
    results = []
    trainer.forward_backward(request, results.append)
    while trainer.run_unit():
        pass
    return results[0]


def _reference(datums, loss_fn):
    torch.manual_seed(SEED)
    model = get_peft_model(_base(), lora_config(LORA))
    total, logprobs = 0.0, []
    for datum in datums:
        logits = model(input_ids=torch.from_numpy(datum.tokens)[None]).logits[0].float()
        lp = torch.log_softmax(logits, -1).gather(
            1, torch.from_numpy(datum.inputs["target_tokens"])[:, None]
        )[:, 0]
        if loss_fn == "importance_sampling":
            loss = -(
                torch.exp(lp - torch.from_numpy(datum.inputs["logprobs"]))
                * torch.from_numpy(datum.inputs["advantages"])
            ).sum()
        else:
            loss = -(lp * torch.from_numpy(datum.inputs["weights"])).sum()
        loss.backward()
        total += float(loss.detach())
        logprobs.append(lp.detach().numpy())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return total, logprobs, grads


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling"])
@pytest.mark.parametrize("layers_per_unit, micro_batch_tokens", [(None, 4096), (1, 12)])
def test_logprobs_loss_and_gradients_equal_plain_peft(loss_fn, layers_per_unit, micro_batch_tokens):
    datums = _datums()
    trainer = TinkerTrainer(
        _base(), LORA, SEED, layers_per_unit=layers_per_unit, micro_batch_tokens=micro_batch_tokens
    )
    result = _run(trainer, _request(datums, loss_fn))
    loss, logprobs, grads = _reference(datums, loss_fn)
    assert result.metrics["loss:sum"] == pytest.approx(loss, rel=1e-4)
    assert result.metrics["tokens:sum"] == sum(len(d.tokens) for d in datums)
    for ours, theirs in zip(result.logprobs, logprobs, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    named = dict(trainer.model.named_parameters())
    for name, grad in grads.items():
        torch.testing.assert_close(named[name].grad, grad, rtol=1e-3, atol=1e-5)


def test_forward_only_leaves_gradients_alone_and_optim_step_uses_the_given_adam():
    datums = _datums()
    trainer = TinkerTrainer(_base(), LORA, SEED)
    probe = _run(trainer, _request(datums, forward_only=True))
    assert all(p.grad is None for p in trainer.params)
    _run(trainer, _request(datums))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = []
    trainer.optim_step(
        AdamParams(learning_rate=0.05, beta1=0.5, beta2=0.9, eps=1e-6, grad_clip_norm=1.0), metrics.append
    )
    assert trainer.run_unit() and not trainer.run_unit()
    assert "grad_norm" in metrics[0] and all(p.grad is None for p in trainer.params)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (0.05, (0.5, 0.9), 1e-6)
    moved = [
        n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert moved
    after = _run(trainer, _request(datums, forward_only=True))
    assert after.metrics["loss:sum"] != probe.metrics["loss:sum"]


def test_a_loop_of_forward_backward_and_optim_step_learns():
    datums = _datums(4, seed=1)
    trainer = TinkerTrainer(_base(), LORA, SEED, layers_per_unit=1)
    losses = []
    for _ in range(20):
        losses.append(_run(trainer, _request(datums)).metrics["loss:sum"])
        trainer.optim_step(AdamParams(learning_rate=1e-2), lambda m: None)
        trainer.run_unit()
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.steps == 20 and trainer.pending == 0


def test_peek_lists_the_units_about_to_run():
    trainer = TinkerTrainer(_base(), LORA, SEED, layers_per_unit=1, micro_batch_tokens=12)
    trainer.forward_backward(_request(_datums()), lambda r: None)
    trainer.optim_step(AdamParams(), lambda m: None)
    units = trainer.peek(1000)
    kinds = [u.kind for u in units]
    assert kinds.count("optimizer") == 1 and kinds[-1] == "optimizer"
    assert kinds.count("loss") >= 2  # more than one micro-batch at 12 tokens
    ran = 0
    while trainer.run_unit():
        ran += 1
    assert ran == len(units)
