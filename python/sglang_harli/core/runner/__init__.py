"""The unit runner and what it runs: work sources, the scheduling object that picks the next one, and the
host protocol through which the finetune side reaches the scheduler it lives in.

A *work source* (``source.WorkSource``) is anything with finetune units to run: a finetune job
(``core.jobs.source``) or a Tinker training client (``core.tinker.models``). The runner
(``runner.UnitRunner``) executes the QoS policy's plan unit by unit and asks one scheduling object
(``order.SourceOrder``) which source goes next. ``host.Host`` names everything the finetune side needs from
SGLang's scheduler, so the whole of it (``finetuning.Finetuning``) runs in tests over a fake host, without
a server.
"""
