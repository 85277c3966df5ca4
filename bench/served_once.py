"""After a run against a Redis of your own (REDIS_URL): was every reply served once, and did each end?

    python -m bench.served_once

Reads every reply stream (`shallow:stream:*`) still in Redis and counts its events: a reply served once
has one start event and one done event; a reply handed on after a worker died has more than one start
(attempt 2 and so on) and still one done; a lost reply has no done and no error. Exits 1 when a reply
ended twice, or did not end.
"""
from __future__ import annotations

import collections
import json
import sys

from shared.protocol import EVENT_FIELD, Done, Error, Start, decode_event
from shared.redis_conn import connect
from shared.settings import Settings


def main() -> int:
    settings = Settings.from_env()
    if not settings.redis_url:
        print("set REDIS_URL to the Redis the run used", file=sys.stderr)
        return 2
    r = connect(settings.redis_url)
    tally: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    for key in r.scan_iter(match="shallow:stream:*", count=1000):
        starts = dones = errors = 0
        for _, fields in r.xrange(key):
            raw = fields.get(EVENT_FIELD.encode()) or fields.get(EVENT_FIELD)
            event = decode_event(raw)
            starts += isinstance(event, Start)
            dones += isinstance(event, Done)
            errors += isinstance(event, Error)
        kind = f"starts={starts} dones={dones} errors={errors}"
        tally[kind] += 1
        if dones + errors != 1:
            bad.append(f"{key.decode() if isinstance(key, bytes) else key}: {kind}")
    print(json.dumps({"replies": sum(tally.values()), "by_events": dict(tally), "not_ended_once": bad[:20]}, indent=1))
    return 1 if bad or not tally else 0


if __name__ == "__main__":
    raise SystemExit(main())
