"""Bad input gets a clear message and nothing is lost."""
from __future__ import annotations

import selectors
import subprocess
import sys
import time

import pytest

from shared.client import TurnClient, Waiting
from shared.errors import BadInput, ChannelBusy
from shared.protocol import Mode
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_cli(args, env, stdin="", timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], env=env, cwd=ROOT, input=stdin, capture_output=True,
        text=True, timeout=timeout,
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_message_is_refused_and_nothing_is_queued(env, text):
    client = TurnClient(env.settings())
    with pytest.raises(BadInput, match="empty"):
        client.say("console:x", text)
    assert client.queue.count == 0 and client.store.turn_in_flight("console:x") is None


def test_an_overlong_message_is_refused_with_the_limit(env):
    client = TurnClient(env.settings(max_input_chars=50))
    with pytest.raises(BadInput, match="51 characters long; the limit is 50"):
        client.say("console:x", "x" * 51)
    assert client.queue.count == 0


@pytest.mark.parametrize("title, message", [("", "needs a title"), ("   ", "needs a title"), ("T" * 101, "limit is 100")])
def test_a_bad_story_title_is_refused(env, title, message):
    client = TurnClient(env.settings())
    with pytest.raises(BadInput, match=message):
        client.start_story("console:x", title)
    assert client.queue.count == 0 and client.store.get("console:x", Mode.STORY) is None


def test_console_explains_bad_input_without_a_traceback(env):
    proc = run_cli(["chat", "--channel", "console:bad"], env.vars(SHALLOW_MAX_INPUT_CHARS="20"),
                   stdin="   \n" + "y" * 30 + "\n/story\n/reset\n/nonsense\n/end\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Your message is empty" in out
    assert "30 characters long; the limit is 20" in out
    assert "A story needs a title" in out
    assert "There was nothing to forget here yet." in out
    assert "Unknown command /nonsense" in out
    assert "There is no story running here." in out
    assert "Traceback" not in out + proc.stderr
    assert TurnClient(env.settings()).queue.count == 0


def test_a_second_message_while_a_reply_is_pending_gets_a_notice(env):
    client = TurnClient(env.settings())
    first = client.say("console:busy", "first")
    with pytest.raises(ChannelBusy) as info:
        client.say("console:busy", "second")
    assert info.value.job_id == first.job_id
    assert client.queue.count == 1  # the first is still queued, the second was not silently dropped: it was refused


def test_no_worker_alive_the_message_waits_and_is_answered_when_one_starts(env, start_worker, processes):
    client = TurnClient(env.settings())
    sub = client.say("console:wait", "Hello?")
    first = next(iter(client.follow(sub.job_id, poll=0.2)))
    assert first == Waiting(position=1, workers=0)

    # the console says so in words
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "chat", "--channel", "console:wait2"], env=env.vars(), cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    processes.procs.append(proc)
    proc.stdin.write("Are you there?\n")
    proc.stdin.flush()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = ""
    deadline = time.monotonic() + 60
    while "no worker is running" not in seen and time.monotonic() < deadline:
        if sel.select(timeout=1):
            seen += proc.stdout.readline()
    assert "no worker is running yet: your message waits in the queue until one starts" in seen

    start_worker()
    out, err = proc.communicate(timeout=240)  # closes stdin: the console leaves after this reply
    assert proc.returncode == 0, err
    assert "bot> " in out
    assert len(client.store.history("console:wait2", Mode.CHAT)) == 2
    # the first message waited too, and was answered
    events = list(client.follow(sub.job_id, timeout=240, poll=0.5))
    assert events[-1].type.value == "done"


@pytest.mark.parametrize(
    "setting, value, named",
    [
        ("SHALLOW_BASE_MODEL", "/no/such/model", "The base model folder /no/such/model does not exist."),
        ("SHALLOW_ADAPTER", "/no/such/adapter", "The adapter folder /no/such/adapter does not exist."),
    ],
)
def test_a_model_or_adapter_that_does_not_exist_stops_the_worker_with_its_name(env, setting, value, named):
    proc = run_cli(["worker"], env.vars(**{setting: value}))
    assert proc.returncode == 3
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_adapter_folder_without_an_adapter_is_named(env, tmp_path):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    proc = run_cli(["worker"], env.vars(SHALLOW_ADAPTER=str(empty)))
    assert proc.returncode == 3
    assert f"The adapter folder {empty} has no adapter_config.json" in proc.stderr


@pytest.mark.parametrize("args, overrides, said", [
    (["worker", "--fronts", "-1"], {}, "--fronts must be 0 or more, got -1"),
    (["worker", "--fronts", "2"], {"SHALLOW_BACKEND": "transformers"}, "--fronts (SHALLOW_FRONTS) needs SHALLOW_BACKEND=batched"),
    (["worker"], {"SHALLOW_FRONTS": "two"}, "SHALLOW_FRONTS must be a whole number or auto, got 'two'"),
])
def test_bad_fronts_settings_are_refused_with_a_clear_message(env, args, overrides, said):
    proc = run_cli(args, env.vars(**overrides), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said in proc.stderr
    assert "Traceback" not in proc.stderr
