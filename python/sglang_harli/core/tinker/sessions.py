"""The Tinker API's sessions: which are alive, and the training clients each holds (engine-free).

A training client holds an adapter, its gradients and AdamW's state on the server, so the server keeps
a bounded number of them and must know when one is no longer wanted. The SDK says so in two ways: its
``ServiceClient`` beats ``session_heartbeat`` every 10 s while it lives, and ``close()`` (or leaving a
``with`` block) finishes the session. A session that finishes, or whose heartbeat has been silent for
``SESSION_TIMEOUT_S``, has ended, and its training clients go with it; what they saved stays.

A model id is ``<session>:train:<n>`` (the SDK derives it itself), so a client's session is read off its
id. Creating one is idempotent on that id (the SDK resends a submission whose answer was lost), so the
request id of the first submission is kept with it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from sglang_harli.core.errors import TooManyJobs

SESSION_TIMEOUT_S = 120.0
"""A session silent this long (twelve missed heartbeats) has ended."""


def session_of(client_id: str) -> str:
    """The session a training client (``<session>:train:<n>``) or a sampling session
    (``<session>:sample:<n>``, ``sampling_session_id``) belongs to."""
    return re.split(r":(?:train|sample):", client_id, maxsplit=1)[0]


def sampling_session_id(session: str, number: int) -> str:
    """A sampling session's id: the ``sampling_session_seq_id`` the SDK numbers its session's with."""
    return f"{session}:sample:{number}"


class Sessions:
    def __init__(
        self,
        max_models: int,
        *,
        timeout_s: float = SESSION_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_models, self.timeout_s, self._clock = max_models, timeout_s, clock
        self._beats: dict[str, float] = {}  # session -> when it last showed it is alive
        self._models: dict[str, str] = {}  # model id -> the request id of the submission creating it

    def beat(self, session: str) -> None:
        self._beats[session] = self._clock()

    @property
    def any_alive(self) -> bool:
        return bool(self._beats)

    def creating(self, model_id: str) -> str | None:
        """The request id a create of ``model_id`` already got (a resent submission), else ``None``."""
        return self._models.get(model_id)

    def reserve(self, model_id: str, new_request_id: Callable[[], str]) -> str:
        """Hold a place for a new training client and give its creation a request id; ``TooManyJobs``
        (429, on which the SDK backs off and retries) when ``max_models`` exist or are being made."""
        if len(self._models) >= self.max_models:
            raise TooManyJobs(
                "model_id", f"{len(self._models)} training clients exist, the most this server keeps"
            )
        request_id = self._models[model_id] = new_request_id()
        self.beat(session_of(model_id))
        return request_id

    def release(self, model_id: str) -> None:
        """A create that failed: its place is free again."""
        self._models.pop(model_id, None)

    def end(self, session: str) -> list[str]:
        """End ``session``; the training clients it held, now to be dropped."""
        self._beats.pop(session, None)
        ended = [model_id for model_id in self._models if session_of(model_id) == session]
        for model_id in ended:
            del self._models[model_id]
        return ended

    def expired(self) -> list[str]:
        """Sessions silent for longer than the timeout."""
        now = self._clock()
        return [session for session, at in self._beats.items() if now - at > self.timeout_s]
