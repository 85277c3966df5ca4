"""Counting a client's round trips to Redis in a test: each command or pipeline takes one connection from redis-py's
pool, so the pool's checkouts are the round trips (from any thread)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def round_trips(r):
    """Within the block, the list grows by one for each round trip `r` makes."""
    sent: list[int] = []
    real = r.connection_pool.get_connection

    def counting(*args, **kwargs):
        sent.append(1)
        return real(*args, **kwargs)

    r.connection_pool.get_connection = counting
    try:
        yield sent
    finally:
        r.connection_pool.get_connection = real
