"""``SourceOrder``: the one scheduling object that says which work source runs the next unit.

Sources register when they start (a job the runner started, a Tinker client created) and leave when they
end. Today's policy: an interactive source (a Tinker client, whose loop waits on every answer) before a
batch job, and within each kind the oldest first. The next policy (fair shares across many sources)
replaces ``next`` and nothing else.
"""

from __future__ import annotations

from sglang_harli.core.runner.source import WorkSource


class SourceOrder:
    def __init__(self) -> None:
        self._sources: list[WorkSource] = []

    def add(self, source: WorkSource) -> None:
        self._sources.append(source)

    def remove(self, source: WorkSource) -> None:
        if source in self._sources:
            self._sources.remove(source)

    @property
    def pending(self) -> bool:
        return any(source.pending for source in self._sources)

    def next(self) -> WorkSource | None:
        """The source whose unit runs next: the oldest ready interactive one, else the oldest ready one."""
        for interactive in (True, False):
            for source in list(self._sources):  # ``ready`` may end a source (a job's last average came in)
                if source.interactive is interactive and source.pending and source.ready():
                    return source
        return None
