"""A choose-your-own-adventure through the whole path, surviving restarts of the worker and of Redis."""
from __future__ import annotations

import signal

import pytest

from shared.client import TurnClient
from shared.protocol import Mode
from tests.e2e.helpers import Done, collect

pytestmark = pytest.mark.slow


def _turn(client, submit) -> Done:
    events, last = collect(client, submit.job_id)
    assert isinstance(last, Done), last
    return last


def test_a_story_starts_continues_and_survives_restarts(env, start_worker, processes):
    worker = start_worker()
    client = TurnClient(env.settings())
    channel = "telegram:42"

    first = _turn(client, client.start_story(channel, "The Lost Crown"))
    assert 2 <= len(first.choices) <= 4
    for n, choice in enumerate(first.choices, 1):
        assert f"{n}. {choice}" in first.text  # the menu is part of the streamed passage
    story = client.store.get(channel, Mode.STORY)
    assert story.title == "The Lost Crown" and story.choices == first.choices and story.turns == 1

    # a number picks the choice on offer
    sub = client.say(channel, "2")
    assert sub.request.text == f"I choose: {first.choices[1]}" and sub.request.user_text == "2"
    second = _turn(client, sub)
    assert 2 <= len(second.choices) <= 4

    # free text is an action too
    sub = client.say(channel, "I climb the tallest tower and look for the crown")
    assert sub.request.text == "I climb the tallest tower and look for the crown"
    third = _turn(client, sub)

    history = client.store.history(channel, Mode.STORY)
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    assert [m["content"] for m in history[1::2]] == [first.text, second.text, third.text]

    # restart the worker and Redis: the story lives in Redis' append-only file
    processes.kill(worker, signal.SIGTERM)
    assert worker.returncode is not None
    old_pid = env.redis.pid
    env.redis.stop()
    env.redis.start()
    assert env.redis.pid != old_pid
    start_worker()
    client = TurnClient(env.settings())
    story = client.store.get(channel, Mode.STORY)
    assert story.title == "The Lost Crown" and story.turns == 3 and story.choices == third.choices
    assert client.store.history(channel, Mode.STORY) == history

    fourth = _turn(client, client.say(channel, "1"))
    assert fourth.text
    assert len(client.store.history(channel, Mode.STORY)) == 8

    ended = client.end_story(channel)
    assert ended.title == "The Lost Crown"
    assert client.store.mode(channel) is Mode.CHAT
