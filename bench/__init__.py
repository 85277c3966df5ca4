from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def own_redis(prefix: str) -> Iterator[str]:
    """A redis-server of the bench's own, its data in a temporary folder; yields its URL and stops it after."""
    from shared.redis_conn import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        try:
            yield url
        finally:
            server.stop()
