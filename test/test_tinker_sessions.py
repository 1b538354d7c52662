"""Tinker sessions: places for training clients are bounded, a resent create finds its first request id,
and a session that finishes or falls silent gives its clients' places back."""

import itertools

import pytest

from sglang_harli.core.errors import TooManyJobs
from sglang_harli.core.tinker.sessions import Sessions, sampling_session_id, session_of


def test_places_are_bounded_and_given_back_when_a_session_ends():
    now = [0.0]
    sessions = Sessions(2, timeout_s=120, clock=lambda: now[0])
    ids = (f"req-{n}" for n in itertools.count())
    first = sessions.reserve("sess-a:train:0", lambda: next(ids))
    assert sessions.creating("sess-a:train:0") == first  # a resent create gets the same request id
    sessions.reserve("sess-b:train:0", lambda: next(ids))
    with pytest.raises(TooManyJobs) as refused:
        sessions.reserve("sess-b:train:1", lambda: next(ids))
    assert refused.value.field == "model_id"
    assert sessions.end("sess-a") == ["sess-a:train:0"]
    sessions.reserve("sess-b:train:1", lambda: next(ids))  # its place is free again

    now[0] = 100.0
    sessions.beat("sess-b")
    now[0] = 220.0
    assert sessions.expired() == []  # silent for exactly the timeout: not yet
    now[0] = 220.1
    assert sessions.expired() == ["sess-b"]
    assert sorted(sessions.end("sess-b")) == ["sess-b:train:0", "sess-b:train:1"]
    assert session_of("sess-x:train:12") == "sess-x"
    assert session_of(sampling_session_id("sess-x", 3)) == "sess-x"
