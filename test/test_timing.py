"""Device timing read without waiting: ``core.colocation.timing`` with events that finish when the test
says."""

from sglang_harli.core.colocation.timing import EventStopwatch, HostStopwatch, PendingTimings


class FakeEvent:
    """A CUDA event stand-in: recorded at a device time, done once the device clock has passed it."""

    device_now = 0.0
    clock = 0.0

    def __init__(self):
        self.at = None

    def record(self):
        self.at = FakeEvent.clock

    def query(self):
        return self.at is not None and FakeEvent.device_now >= self.at

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


def test_a_cost_is_read_once_the_device_has_finished_it_and_never_waited_for():
    watch = EventStopwatch(FakeEvent)
    pending = PendingTimings()
    for name, seconds in (("a", 0.010), ("b", 0.004)):
        started = watch.start()
        FakeEvent.clock += seconds  # the work as the device will run it
        pending.add(name, watch.stop(started))
    assert list(pending.ready()) == []  # the host is ahead of the device: nothing to read yet
    FakeEvent.device_now = 0.011  # "a" finished, "b" not yet
    [(name, seconds)] = list(pending.ready())
    assert name == "a" and abs(seconds - 0.010) < 1e-9 and len(pending) == 1
    FakeEvent.device_now = 1.0
    [(name, seconds)] = list(pending.ready())
    assert name == "b" and abs(seconds - 0.004) < 1e-9 and len(pending) == 0


def test_on_the_host_the_cost_is_known_at_once():
    watch = HostStopwatch()
    timing = watch.stop(watch.start())
    assert timing.seconds() is not None and timing.seconds() >= 0
