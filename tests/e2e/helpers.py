from __future__ import annotations

from shared.client import TurnClient, Waiting
from shared.protocol import Chunk, Done, Error, Start


def collect(client: TurnClient, job_id: str, timeout: float = 240) -> tuple[list, Done | Error]:
    """All events of a reply, and its last one."""
    events = list(client.follow(job_id, timeout=timeout, poll=0.5))
    return events, events[-1]


def chunks_of(events: list, attempt: int | None = None) -> list[str]:
    if attempt is None:
        attempt = max((e.attempt for e in events if isinstance(e, Start)), default=1)
    return [e.text for e in events if isinstance(e, Chunk) and e.attempt == attempt]


__all__ = ["collect", "chunks_of", "Chunk", "Done", "Error", "Start", "Waiting"]
