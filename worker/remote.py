"""The model in one process, the jobs in others: `shallow worker --fronts N`.

A worker process runs every job's RQ bookkeeping (about 57 Redis commands and ~5 ms of CPU a job,
`python -m bench.rq_cost`), its session reads and writes and the text of its reply on one interpreter
lock, the same lock the engine's loop needs: replies that arrive together wait for each other there.
With `--fronts N` the process that holds the model runs only the engine; N front processes (ordinary
`shallow worker` processes with `--slots`) run the RQ worker loops and the jobs, and hand each reply's
prompt to the engine over a Unix socket (multiprocessing.connection, with a random key). Every job is
still one RQ job in one RQ worker, as before.

Protocol (pickled tuples): a front sends ("submit", id, token ids, max new tokens, end-of-sequence ids,
temperature, top-p, repetition penalty) and ("cancel", id); the engine process answers with lists of
(id, item): new token ids, ("done", tokens generated, the request's token limit) or ("error", kind,
message). When the model process goes away, the fronts' replies in flight fail (RQ retries them) and
the fronts stop; when a front goes away, its replies in the engine are cancelled.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import socket
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener, answer_challenge, deliver_challenge

from shared.errors import ConfigError
from shared.settings import Settings
from worker.batching import BatchedBackend
from worker.engine import EngineStopped, Request

logger = logging.getLogger(__name__)

ENV_ADDRESS = "SHALLOW_ENGINE_ADDRESS"  # set for the fronts: the engine's socket
ENV_KEY = "SHALLOW_ENGINE_KEY"  # and the key it accepts (hex)
ERRORS = {"ValueError": ValueError, "EngineStopped": EngineStopped}  # raised again as themselves in the front


def _shut_down(conn) -> None:
    """Wake every thread blocked on a connection (EOF or a broken pipe), here and at the other end, and keep its
    descriptor: the caller holds the lock under which the descriptor is given back (`_release`).

    Closing the descriptor alone leaves a blocked read blocked, and the peer sees nothing. And a descriptor given
    back while another thread may still use it (a reader that has taken its number and not yet read, a sender
    mid-write) goes to the next socket this process opens, which that thread then reads or writes: CI saw a front
    that connected meanwhile fail its key's exchange ("bad message length"). So a connection is shut down first,
    and its descriptor closed only by its reading thread, once nothing else can use it."""
    try:
        dup = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


def _release(conn) -> None:
    try:
        conn.close()
    except OSError:
        pass


def _encode_error(exc: BaseException) -> tuple[str, str, str]:
    kind = type(exc).__name__
    return ("error", kind if kind in ERRORS else "RuntimeError", str(exc))


# -- in the process that holds the model -----------------------------------------------------------


class EngineServer:
    """Serves one process's engine to its fronts; each connection gets a reader and a sender thread."""

    def __init__(self, backend: BatchedBackend, address: str, authkey: bytes) -> None:
        self.backend = backend
        self.engine = backend.engine
        self.hello = {
            "context_tokens": backend.context_tokens,
            "description": backend.description,
            "eos": sorted(backend.eos),
            "tokenizer": backend.tokenizer.name_or_path,
        }
        # The key is checked for each connection in a thread of its own (not in `accept`, as a Listener given the key
        # does): a peer that connects and never answers the challenge must not keep the next fronts out.
        self.authkey = authkey
        self.listener = Listener(address, family="AF_UNIX")
        self.closed = False
        self.links: list[_Link] = []
        self.links_lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, name="engine-server", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn = self.listener.accept()
            except Exception:  # a closed listener, or a connection that failed at once; the next front may be fine
                if self.closed:
                    return
                logger.warning("a connection to the engine failed", exc_info=True)
                continue
            threading.Thread(target=self._admit, args=(conn,), name="engine-admit", daemon=True).start()

    def _admit(self, conn) -> None:
        try:  # what Listener(authkey=...).accept() does, here off the accepting thread
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except (AuthenticationError, EOFError, OSError):
            logger.warning("a connection to the engine was refused (wrong key, or it hung up)", exc_info=True)
            conn.close()
            return
        link = _Link(self, conn)
        with self.links_lock:
            self.links = [other for other in self.links if not other.closed] + [link]  # fronts come and go
        link.start()

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        for link in self.links:
            link.close()


class _Forward:
    """Stands in for a request's queue in the engine process: what the engine puts goes to the front."""

    def __init__(self, link: _Link, rid: int, request: Request) -> None:
        self.link, self.rid, self.request = link, rid, request

    def put(self, item) -> None:
        self.link.post(self.rid, self.request, item)


class _Link:
    """One front's connection, in the engine process."""

    def __init__(self, server: EngineServer, conn) -> None:
        self.server, self.engine, self.conn = server, server.engine, conn
        self.requests: dict[int, Request] = {}
        self.outbox: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.released = False  # the descriptor given back: only by the reading thread, after the sender stopped
        self.sender = threading.Thread(target=self._send, name="engine-link-send", daemon=True)

    def start(self) -> None:
        try:
            self.conn.send(("hello", self.server.hello))
        except (OSError, ValueError):
            logger.warning("a front hung up before its greeting")
            self.closed = self.released = True
            _release(self.conn)
            return
        self.sender.start()
        threading.Thread(target=self._read, name="engine-link-read", daemon=True).start()

    def post(self, rid: int, request: Request, item) -> None:
        with self.cond:
            self.outbox.append((rid, request, item))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify()
            if not self.released:
                _shut_down(self.conn)  # the reading thread wakes, and gives the descriptor back

    def _read(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "submit":
                    _, rid, ids, max_new, eos, temperature, top_p, penalty = message
                    request = Request(ids=list(ids), max_new_tokens=int(max_new), eos=frozenset(eos),
                                      temperature=float(temperature), top_p=float(top_p), repetition_penalty=float(penalty))
                    request.out = _Forward(self, rid, request)  # type: ignore[assignment]
                    self.requests[rid] = request
                    try:
                        self.engine.submit(request)
                    except Exception as exc:  # noqa: BLE001 - a prompt too long, a stopped engine: the front's error
                        request.out.put(exc)
                elif message[0] == "cancel":
                    request = self.requests.pop(message[1], None)
                    if request is not None:
                        self.engine.cancel(request)
        except (EOFError, OSError):
            pass  # the front went away
        except Exception:  # a message that is not ours: drop this front, keep the engine
            logger.exception("a front sent what the engine cannot read; closing its connection")
        for request in list(self.requests.values()):  # nobody is reading these replies any more
            self.engine.cancel(request)
        self.requests.clear()
        self.close()
        self.sender.join()  # shut down, its send (if any) fails at once; then nobody writes to the descriptor
        with self.cond:
            self.released = True
            _release(self.conn)

    def _send(self) -> None:
        while True:
            with self.cond:
                while not self.outbox and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                items = list(self.outbox)
                self.outbox.clear()
            batch = []
            for rid, request, item in items:
                if item is None:
                    batch.append((rid, ("done", request.generated, request.max_new_tokens)))
                    self.requests.pop(rid, None)
                elif isinstance(item, BaseException):
                    batch.append((rid, _encode_error(item)))
                    self.requests.pop(rid, None)
                else:
                    batch.append((rid, item))
            try:
                self.conn.send(batch)
            except (OSError, ValueError):
                self.close()
                return


# -- in a front --------------------------------------------------------------------------------


class RemoteEngine:
    """The slot engine's interface (submit, cancel, stop) over a connection to the process that holds it."""

    def __init__(self, address: str, authkey: bytes, on_lost=None) -> None:
        conn = None
        try:
            conn = Client(address, family="AF_UNIX", authkey=authkey)
            _, self.info = conn.recv()
        except (OSError, EOFError, AuthenticationError) as exc:
            if conn is not None:
                _release(conn)
            raise ConfigError(f"cannot reach the model process at {address}: {exc or type(exc).__name__}") from None
        self.conn = conn
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.lost = False  # set, and the descriptor given back, by the reading thread, under the lock that sends
        self.stopping = False
        self.on_lost = on_lost
        self.thread = threading.Thread(target=self._read, name="engine-client", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.lock:
            if self.lost:
                raise EngineStopped("the model process is gone")
            rid = next(self.ids)
            request.engine_id = str(rid)
            self.requests[rid] = request
            try:
                self.conn.send(("submit", rid, request.ids, request.max_new_tokens, sorted(request.eos),
                                request.temperature, request.top_p, request.repetition_penalty))
            except (OSError, ValueError):
                self.requests.pop(rid, None)
                raise EngineStopped("the model process is gone") from None

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.lock:
            if request.engine_id and self.requests.pop(int(request.engine_id), None) is not None and not self.lost:
                try:
                    self.conn.send(("cancel", int(request.engine_id)))
                except (OSError, ValueError):
                    pass

    def stop(self, timeout: float = 10) -> None:
        self.stopping = True
        with self.lock:
            if not self.lost:
                _shut_down(self.conn)  # the reading thread wakes, and gives the descriptor back

    def _read(self) -> None:
        try:
            while True:
                for rid, item in self.conn.recv():
                    request = self.requests.get(rid)
                    if request is None:  # cancelled here meanwhile
                        continue
                    if isinstance(item, list):
                        request.out.put(item)
                    elif item[0] == "done":
                        request.generated, request.max_new_tokens = item[1], item[2]
                        self.requests.pop(rid, None)
                        request.out.put(None)
                    else:
                        self.requests.pop(rid, None)
                        request.out.put(ERRORS.get(item[1], RuntimeError)(item[2]))
        except (EOFError, OSError, TypeError):
            pass
        except Exception:  # noqa: BLE001 - what the model process sent cannot be read: as if it were gone
            logger.exception("the model process sent what this front cannot read")
        with self.lock:  # always reached: the replies in flight fail, and the descriptor is given back
            self.lost = True
            pending = list(self.requests.values())
            self.requests.clear()
            _release(self.conn)
        for request in pending:
            request.out.put(EngineStopped("the model process is gone"))
        if not self.stopping:
            logger.error("the model process is gone: this front stops (its replies in flight are retried by RQ)")
            if self.on_lost is not None:
                self.on_lost()


class RemoteBackend(BatchedBackend):
    """The batched backend of a front: its own tokenizer (chat template, counting, decoding), the model elsewhere."""

    @classmethod
    def connect(cls, address: str, authkey: bytes, on_lost=None) -> RemoteBackend:
        from transformers import AutoTokenizer

        engine = RemoteEngine(address, authkey, on_lost)
        info = engine.info
        tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
        return cls(None, tokenizer, "remote", int(info["context_tokens"]), f"{info['description']}, through its model process",
                   engine=engine, eos=frozenset(info["eos"]))


def connect_from_env(settings: Settings) -> RemoteBackend | None:
    """In a front (its parent set the engine's address): the remote backend; elsewhere None."""
    address = os.environ.get(ENV_ADDRESS)
    if not address:
        return None

    def lost() -> None:  # the fronts' main thread stops the slots (they finish failing what they hold)
        os.kill(os.getpid(), signal.SIGTERM)

    return RemoteBackend.connect(address, bytes.fromhex(os.environ.get(ENV_KEY, "")), on_lost=lost)


def share_slots(slots: int, fronts: int) -> list[int]:
    """The slots of each front: all of them shared out, the first fronts taking one more when uneven;
    never more fronts than slots."""
    fronts = max(1, min(fronts, slots))
    return [slots // fronts + (1 if i < slots % fronts else 0) for i in range(fronts)]


def serve(settings: Settings, backend: BatchedBackend, name: str | None) -> int:
    """Hold the model, serve its engine on a socket, and run `settings.fronts` front processes over it."""
    import shutil
    import tempfile

    from worker.supervisor import supervise

    folder = tempfile.mkdtemp(prefix="shallow-engine-")
    address = os.path.join(folder, "engine.sock")
    authkey = os.urandom(16)
    server = EngineServer(backend, address, authkey)
    shares = share_slots(max(1, settings.slots), settings.fronts or 1)
    env = {ENV_ADDRESS: address, ENV_KEY: authkey.hex(), "SHALLOW_FRONTS": "0"}
    base = name or f"{socket.gethostname()}-{os.getpid()}"
    logger.info("model process %s: %d fronts (%s slots) over %s", base, len(shares), "+".join(map(str, shares)),
                backend.description)
    try:
        return supervise(len(shares), [], base, env=env, each=[{"SHALLOW_SLOTS": str(n)} for n in shares])
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
