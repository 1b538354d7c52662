"""Run one of tinker-cookbook's recipes (``sl_loop`` or ``rl_loop``) unchanged, on small local data.

    python test/cookbook_recipe.py sl_loop <tokenizer dir> base_url=... model_name=... [key=value ...]

The recipes download two things before they train, and nothing else: a tokenizer (Hugging Face, by the
model's name) and a dataset (``datasets.load_dataset``). This runner provides both through the cookbook's
and the datasets library's own entry points (``tokenizer_utils.register_tokenizer``; ``load_dataset``
answering with rows of the same shape), then calls the recipe's ``main`` with the rest of the command
line as its chz config. The training loop itself, and every SDK call it makes, is the cookbook's.
"""

import sys

import chz
import datasets
from tinker_cookbook import tokenizer_utils
from transformers import AutoTokenizer

# HuggingFaceH4/no_robots: chat rows (``messages``); the recipe trains on the assistant's turns.
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Say the number {n}."},
            {"role": "assistant", "content": f"{n}"},
        ]
    }
    for n in range(8)
]
# openai/gsm8k "main": a question and a worked answer ending in "#### <answer>".
PROBLEMS = [
    {"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(4)
]


def load_dataset(path, *args, **kwargs):
    rows = {"HuggingFaceH4/no_robots": CHATS, "openai/gsm8k": PROBLEMS}[path]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})


def main() -> None:
    recipe, tokenizer_dir, *config = sys.argv[1:]
    model_name = next(arg.split("=", 1)[1] for arg in config if arg.startswith("model_name="))
    tokenizer_utils.register_tokenizer(model_name, lambda: AutoTokenizer.from_pretrained(tokenizer_dir))
    datasets.load_dataset = load_dataset
    if recipe == "sl_loop":
        from tinker_cookbook.recipes import sl_loop as module
    else:
        from tinker_cookbook.recipes import rl_loop as module
    sys.argv = [recipe, *config]
    chz.nested_entrypoint(module.main)


if __name__ == "__main__":
    main()
