"""sglang-harli: co-locate PEFT (LoRA) finetuning with SGLang decode, within the decode SLO.

``sglang_harli.core`` is engine-independent (no SGLang import); ``sglang_harli.srt`` plugs it into SGLang.
"""

__version__ = "0.1.0"
