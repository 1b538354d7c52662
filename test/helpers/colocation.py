"""Stand-ins for the co-location tests: a fake clock, a scripted predictor, and plans of finetune units."""

from sglang_harli.core.colocation.work import FinetuneWork


def micro_batch(tokens=64, layers=4):
    return (
        [FinetuneWork(kind="forward", tokens=tokens, layers=1) for _ in range(layers)]
        + [FinetuneWork(kind="loss", tokens=tokens)]
        + [FinetuneWork(kind="backward", tokens=tokens, layers=1) for _ in range(layers)]
    )


def plan(micro_batches=3, accumulation=2):
    units = []
    for index in range(micro_batches):
        units += micro_batch(tokens=32 * (index + 1))
        if index % accumulation == accumulation - 1:
            units.append(FinetuneWork(kind="optimizer", params=10_000))
    return units


class ScriptedPredictor:
    """Latency = 1 ms per request in the batch + a fixed cost per unit kind and size, times a drift."""

    COST = {"forward": 2e-5, "backward": 4e-5, "loss": 1e-5, "optimizer": 3e-7}

    def __init__(self):
        self.drift = 1.0
        self.known = True

    def solo(self, shape):
        return 1e-3 * shape.batch_size * self.drift

    def unit_seconds(self, work, split="shared"):
        return self.COST[work.kind] * work.size * self.drift if self.known else None

    def work_seconds(self, work):
        return sum(self.unit_seconds(w) for w in work)

    def interval(self, solo_s, work_s, split="shared"):
        return solo_s + {"shared": 1.0, "half": 0.6}[split] * work_s

    def corun(self, shape, work, split="shared"):
        base = 0.0 if shape is None else self.solo(shape)
        return self.interval(base, self.work_seconds(work), split)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now
