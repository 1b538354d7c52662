"""Training data for the engine-free trainer tests."""

import torch

from sglang_harli.core.jobs.data import Example


def make_examples(vocab: int, count: int = 7) -> list[Example]:
    """Prompt/completion-shaped sequences of varied length: targets are a suffix of each."""
    g = torch.Generator().manual_seed(11)
    examples = []
    for _ in range(count):
        n = int(torch.randint(6, 30, (1,), generator=g))
        prompt = int(torch.randint(2, n - 2, (1,), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(Example(input_ids=ids, loss_mask=[i >= prompt for i in range(n)]))
    return examples
