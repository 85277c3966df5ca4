"""worker/remote.py: the engine served over a socket to a front (`shallow worker --fronts N`), in one process here.

The front's backend must give exactly what the backend that holds the model gives (greedy replies token
for token, counts, finish reasons), cancel alone, pass errors on as themselves, and fail what it has in
flight, saying so, when the model process goes away.
"""
from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from shared.settings import Settings

PROMPTS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Count to twenty."}],
    [{"role": "user", "content": "Name three rivers."}],
]


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    from worker.backends import load_backend
    from worker.remote import EngineServer

    settings = dataclasses.replace(Settings.from_env(), base_model=model_dir, adapter=None, backend="batched",
                                   slots=3, context_tokens=256)
    local = load_backend(settings)
    address = str(tmp_path_factory.mktemp("engine") / "engine.sock")
    key = os.urandom(16)
    server = EngineServer(local, address, key)
    yield local, server, address, key, dataclasses.replace(settings.generation, temperature=0.0, repetition_penalty=1.1)
    server.close()
    local.close()


def test_a_front_gets_what_the_model_process_writes(served):
    from worker.remote import RemoteBackend

    local, _, address, key, greedy = served
    front = RemoteBackend.connect(address, key)
    try:
        assert front.model is None and front.context_tokens == local.context_tokens and front.eos == local.eos
        assert "through its model process" in front.description
        expected = []
        for p in PROMPTS:
            gen = local.stream(p, greedy, max_new_tokens=12, ignore_eos=True)
            expected.append(("".join(gen), gen.completion_tokens, gen.finish_reason))
        got: list = [None] * len(PROMPTS)

        def run(i: int) -> None:
            gen = front.stream(PROMPTS[i], greedy, max_new_tokens=12, ignore_eos=True)
            got[i] = ("".join(gen), gen.completion_tokens, gen.finish_reason)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert got == expected
        assert all(count == 12 and reason == "length" for _, count, reason in got)
        # a reply ended by the model's end of sequence: the same count and reason as in the model process
        short = [{"role": "user", "content": "Say only the word yes."}]
        here, there = local.stream(short, greedy, max_new_tokens=40), front.stream(short, greedy, max_new_tokens=40)
        assert ("".join(there), there.completion_tokens, there.finish_reason) == (
            "".join(here), here.completion_tokens, here.finish_reason)
        assert there.finish_reason == "stop"
        # errors come back as themselves
        with pytest.raises(ValueError, match="does not fit"):
            "".join(front.stream([{"role": "user", "content": "word " * 400}], greedy, max_new_tokens=10))
        # a cancelled reply stops alone; the engine gives its row back
        stop = threading.Event()
        cancelled = front.stream(PROMPTS[0], greedy, max_new_tokens=120, ignore_eos=True, should_stop=stop.is_set)
        pieces = iter(cancelled)
        next(pieces)
        stop.set()
        list(pieces)
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 200
        again = front.stream(PROMPTS[1], greedy, max_new_tokens=12, ignore_eos=True)
        assert "".join(again) == expected[1][0]
        engine = local.engine
        from tests.conftest import wait_for

        wait_for(lambda: not engine.live and not engine.waiting, 30, "the engine to give every row back")
    finally:
        front.close()


def test_a_front_fails_its_replies_when_the_model_process_goes(served):
    from worker.engine import EngineStopped
    from worker.remote import RemoteBackend

    local, server, address, key, greedy = served
    lost = threading.Event()
    front = RemoteBackend.connect(address, key, on_lost=lost.set)
    gen = front.stream(PROMPTS[2], greedy, max_new_tokens=120, ignore_eos=True)
    pieces = iter(gen)
    next(pieces)
    for link in server.links:  # the model process's side of every connection closes, as when it dies
        link.close()
    with pytest.raises(EngineStopped, match="model process is gone"):
        list(pieces)
    assert lost.wait(10)  # the front is told, to stop taking jobs
    with pytest.raises(EngineStopped):
        "".join(front.stream(PROMPTS[0], greedy, max_new_tokens=5))
    front.close()
    from tests.conftest import wait_for

    wait_for(lambda: not local.engine.live and not local.engine.waiting, 30, "the engine to drop the orphaned reply")


def test_a_wrong_key_is_refused(served):
    from shared.errors import ConfigError
    from worker.remote import RemoteBackend

    _, _, address, _, _ = served
    with pytest.raises(ConfigError, match="cannot reach the model process"):
        RemoteBackend.connect(address, b"not the key")


def test_a_peer_that_never_answers_does_not_keep_fronts_out(served):
    """A connection that never answers the key's challenge (a stuck or foreign process) holds only itself: the
    model process checks each connection's key in a thread of its own, so the next front still connects."""
    import socket

    from worker.remote import RemoteBackend

    _, _, address, key, greedy = served
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(address)  # and then says nothing
    fronts: list = []
    try:
        connecting = threading.Thread(target=lambda: fronts.append(RemoteBackend.connect(address, key)), daemon=True)
        connecting.start()
        connecting.join(60)  # checked in the accepting thread, the key's exchange waited on the silent peer forever
        assert fronts, "the front could not connect while another connection kept silent"
        assert "".join(fronts[0].stream(PROMPTS[1], greedy, max_new_tokens=5, ignore_eos=True))
    finally:
        silent.close()  # (and lets a blocked exchange end)
        for front in fronts:
            front.close()


def _hold_io(monkeypatch, method: str, io, thread: str) -> tuple[threading.Event, threading.Event, threading.Event]:
    """Make the standard library's `Connection.<method>` (`_recv` or `_send`) hold the thread named `thread` once,
    between taking its descriptor's number and reading or writing it (`io`: os.read or os.write), after `armed` is
    set: `held` is set then, and it goes on when `release` is. Nothing of the project's is changed."""
    from multiprocessing import connection as mpc

    armed, held, release = threading.Event(), threading.Event(), threading.Event()
    original = getattr(mpc.Connection, method)

    def held_io(handle, arg):
        if armed.is_set() and threading.current_thread().name == thread:
            armed.clear()
            held.set()
            release.wait(30)
        return io(handle, arg)

    monkeypatch.setattr(mpc.Connection, method, lambda self, arg, _io=None: original(self, arg, held_io))
    return armed, held, release


def test_a_stopped_fronts_reader_never_reads_the_next_connections_socket(served, monkeypatch):
    """A front's reading thread takes its descriptor's number and then reads; the interpreter may switch threads
    in between. If the front's `stop` gave the descriptor back at once, the next connection this process opened
    got that number, and the old reader read from it: CI saw a new front fail its key's exchange ("bad message
    length"). Here the reader is held between the two (the standard library's read waits, nothing of the project's
    is changed) while the front stops: the number must still name the old socket; the next front connects, the old
    reader reads (its own end), and the next front's reply comes whole."""
    import time

    from worker.remote import RemoteBackend, RemoteEngine

    _, _, address, key, greedy = served
    armed, held, release = _hold_io(monkeypatch, "_recv", os.read, "engine-client")
    armed.set()
    old = RemoteEngine(address, key)
    fronts: list = []
    try:
        assert held.wait(10)  # its reader has its descriptor's number, and waits
        number = old.conn.fileno()
        socket_id = os.fstat(number).st_ino
        old.stop()
        try:  # the number still names the old socket while its reader may read it: nothing else can get it
            still = os.fstat(number).st_ino == socket_id
        except OSError:
            still = False
        assert still, "the stopped front gave its descriptor back while its reader still held the number"
        fronts.append(RemoteBackend.connect(address, key))  # raised ConfigError (bad message length) at times
        release.set()
        time.sleep(0.2)  # the old reader reads now: its own end (end of file), or, before, the new front's socket
        got: list = []
        streaming = threading.Thread(target=lambda: got.append("".join(
            fronts[0].stream(PROMPTS[1], greedy, max_new_tokens=5, ignore_eos=True))), daemon=True)
        streaming.start()
        streaming.join(60)  # a reply whose words the old reader took never ended
        assert got and got[0], "the next front's reply did not come whole"
        old.thread.join(10)
        assert old.lost and not old.thread.is_alive()
    finally:
        release.set()
        for front in fronts:
            front.close()


def test_a_links_descriptor_is_given_back_only_after_its_sender_has_stopped(served, monkeypatch):
    """The model process's side of session 20's fix: when a front goes, the link's reading thread sees the end and
    gives the descriptor back, but its sending thread may hold the descriptor's number between taking it and
    writing. Here the sender is held there (the standard library's write waits, nothing of the project's is
    changed) while the front goes: the number must still name the link's socket until the sender has let go, the
    descriptor must then be given back, and the next front must be served whole."""
    import time

    from tests.conftest import wait_for
    from worker.engine import EngineStopped
    from worker.remote import RemoteBackend

    _, server, address, key, greedy = served
    armed, held, release = _hold_io(monkeypatch, "_send", os.write, "engine-link-send")
    front = RemoteBackend.connect(address, key)
    fronts: list = []
    outcome: list = []

    def stream() -> None:
        try:
            outcome.append("".join(front.stream(PROMPTS[0], greedy, max_new_tokens=60, ignore_eos=True)))
        except EngineStopped as exc:
            outcome.append(exc)

    try:
        with server.links_lock:
            link = server.links[-1]
        armed.set()
        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        assert held.wait(60)  # the link's sender has its descriptor's number, and waits
        number = link.conn.fileno()
        socket_id = os.fstat(number).st_ino
        front.close()  # the front goes: the link's reader sees the end of its connection
        wait_for(lambda: link.closed, 10, "the link to see its front go")
        time.sleep(0.3)  # the reader is past its close, waiting for the sender (before: it had closed the descriptor)
        try:
            still = os.fstat(number).st_ino == socket_id
        except OSError:
            still = False
        assert still, "the link gave its descriptor back while its sender still held the number"
        assert not link.released
        release.set()
        wait_for(lambda: link.released, 10, "the link to give its descriptor back once its sender stopped")
        streaming.join(30)
        assert outcome and isinstance(outcome[0], EngineStopped)  # the front's own reply failed, said so
        fronts.append(RemoteBackend.connect(address, key))
        assert "".join(fronts[0].stream(PROMPTS[1], greedy, max_new_tokens=5, ignore_eos=True))
    finally:
        release.set()
        front.close()
        for other in fronts:
            other.close()


def test_a_front_whose_model_process_sends_what_it_cannot_read_stops_as_if_it_were_gone(tmp_path):
    """Bytes that are not the protocol's (a foreign or broken process at the address): the front's reader fails its
    replies, tells the front to stop and gives its descriptor back, as when the model process goes."""
    from multiprocessing.connection import Listener

    from worker.engine import EngineStopped, Request
    from worker.remote import RemoteEngine

    address, key = str(tmp_path / "engine.sock"), os.urandom(16)
    listener = Listener(address, family="AF_UNIX", authkey=key)
    accepted: list = []

    def serve() -> None:
        conn = listener.accept()
        accepted.append(conn)
        conn.send(("hello", {"context_tokens": 256, "description": "x", "eos": [0], "tokenizer": "x"}))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    lost = threading.Event()
    engine = RemoteEngine(address, key, on_lost=lost.set)
    try:
        server.join(10)
        request = Request(ids=[1, 2, 3], max_new_tokens=4, eos=frozenset({0}), temperature=0.0, top_p=1.0,
                          repetition_penalty=1.0)
        engine.submit(request)
        accepted[0].send_bytes(b"not a pickle at all")
        assert lost.wait(10), "the front was not told to stop"
        assert isinstance(request.out.get(timeout=10), EngineStopped)
        engine.thread.join(10)
        assert engine.lost and not engine.thread.is_alive()
        with pytest.raises(EngineStopped):
            engine.submit(Request(ids=[1], max_new_tokens=1, eos=frozenset({0}), temperature=0.0, top_p=1.0,
                                     repetition_penalty=1.0))
    finally:
        engine.stop()
        for conn in accepted:
            conn.close()
        listener.close()
