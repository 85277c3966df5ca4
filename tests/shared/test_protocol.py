from __future__ import annotations

import json

import pytest

from shared.protocol import (
    Chunk,
    Done,
    Error,
    Mode,
    ProtocolError,
    Start,
    TurnRequest,
    decode_event,
    encode_event,
)


def _request(**kw) -> TurnRequest:
    base = dict(channel="console:a", mode=Mode.STORY, session_id="s1", text="I choose: Run", user_text="2", title="T")
    base.update(kw)
    return TurnRequest(**base)


def test_turn_round_trips_through_json():
    req = _request(reply_to={"chat_id": 5, "message_id": 9})
    data = json.loads(json.dumps(req.to_json()))
    assert data["mode"] == "story" and data["v"] == 1
    assert TurnRequest.from_json(data) == req


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(v=2), "version"),
        (lambda d: d.update(extra=1), "unknown turn fields"),
        (lambda d: d.pop("channel"), "malformed"),
        (lambda d: d.update(mode="poem"), "malformed"),
    ],
)
def test_turn_refuses_what_it_cannot_read(mutate, message):
    data = _request().to_json()
    mutate(data)
    with pytest.raises(ProtocolError, match=message):
        TurnRequest.from_json(data)


@pytest.mark.parametrize(
    "event",
    [
        Start(attempt=2, worker="w1"),
        Chunk(text="héllo ", attempt=1),
        Done(text="hi", prompt_tokens=10, completion_tokens=3, choices=["a", "b"], finish_reason="length"),
        Error(code="model_error", message="failed"),
    ],
)
def test_events_round_trip(event):
    raw = encode_event(event)
    assert json.loads(raw)["type"] == event.type.value
    assert decode_event(raw) == event


def test_event_of_another_version_is_refused():
    raw = json.loads(encode_event(Chunk(text="x")))
    raw["v"] = 99
    with pytest.raises(ProtocolError):
        decode_event(json.dumps(raw))
    with pytest.raises(ProtocolError):
        decode_event("not json")
