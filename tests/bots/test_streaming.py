"""Splitting and delivering long replies: split_text, and TelegramSurface with the real Bot class on the fake API."""
from __future__ import annotations

import asyncio
import random

import pytest

from bots.streaming import split_text
from shared.protocol import Done
from tests.bots.fake_telegram import FakeTelegram


@pytest.mark.parametrize("limit", [50, 200, 4096])
def test_split_text_keeps_every_word_within_the_limit(limit):
    rng = random.Random(limit)
    words = ["crown", "dragon", "a", "x" * 70, "river.", "tower,", "\n\n", "\n", "riddle"]
    text = " ".join(rng.choice(words) for _ in range(3000)).strip()
    parts = split_text(text, limit)
    assert all(0 < len(p) <= limit for p in parts)
    assert "".join("".join(parts).split()) == "".join(text.split())  # nothing lost, nothing added
    # a word is cut only when it is longer than half a part (no space to cut at)
    cursor = 0
    for part in parts[:-1]:
        start = text.index(part, cursor)
        cursor = start + len(part)
        assert len(part) == limit or text[cursor].isspace() or part.endswith("."), (part, text[cursor:cursor + 10])


def test_split_text_prefers_paragraphs():
    text = "First paragraph is here.\n\nSecond paragraph is a little longer than the first."
    assert split_text(text, 40) == ["First paragraph is here.", "Second paragraph is a little longer than", "the first."]
    assert split_text("short", 10) == ["short"]


def test_a_long_final_reply_is_split_at_4096_and_the_keyboard_goes_last(monkeypatch):
    monkeypatch.setenv("PTB_TIMEDELTA", "1")
    from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup

    from bots.telegram_bot import TelegramSurface

    fake = FakeTelegram()
    fake.add_bot("1:T", 1, "b")
    fake.start()
    try:
        chat = 77
        text = " ".join(f"word{i}" for i in range(2000))  # 16,889 characters: five messages
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("1. Go", callback_data="s:x:1:1")]])

        async def run():
            async with Bot("1:T", base_url=fake.base_url) as bot:
                placeholder = await bot.send_message(chat_id=chat, text="⏳ …")
                fake.fail_next("sendMessage", retry_after=1)  # flood control on a follow-up loses nothing
                surface = TelegramSurface(bot, chat, placeholder.message_id, lambda done: markup)
                await surface.finish(Done(text=text, prompt_tokens=1, completion_tokens=2000, choices=["Go"]))

        asyncio.run(run())
        msgs = fake.bot_messages(chat)
        assert len(msgs) == 5 and all(len(m["text"]) <= 4096 for m in msgs)
        assert " ".join(m["text"] for m in msgs).split() == text.split()  # every word, in order
        assert "reply_markup" in msgs[-1] and all("reply_markup" not in m for m in msgs[:-1])
    finally:
        fake.stop()


def test_a_reply_is_recorded_as_owed_before_its_job_is_enqueued(redis_proc, tmp_path):
    """A bot killed between enqueueing a turn and noting it would leave a reply no one delivers. The record goes
    with the claim of the channel, before the job, and gains the reply's session in the job's own transaction:
    Redis' MONITOR shows the order the server ran them in. A refused turn (empty, or its channel busy) is told and
    not left owed."""
    import threading
    from dataclasses import replace

    from bots.streaming import Deliveries
    from shared.client import Turn, TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    deliveries = Deliveries(client, "test", surface_for=lambda where: None)
    seen: dict[str, object] = {}
    refused: list[str] = []
    commands: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        with client.r.monitor() as m:
            watching.set()
            for line in m.listen():
                commands.append(line["command"])
                if "shallow:stop-watching" in line["command"]:
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)

    async def refuse(text: str) -> None:
        refused.append(text)

    async def run() -> None:
        deliveries._spawn = lambda job_id, where: seen.setdefault("spawned", (job_id, where))  # no follower here
        await deliveries.submit(Turn("say", "test:1", "hello"), {"chat": 1}, refuse)
        await deliveries.submit(Turn("say", "test:2", "   "), {"chat": 2}, refuse)
        # the first turn's reply is still to be written (no worker here): its channel is busy
        await deliveries.submit(Turn("say", "test:1", "again"), {"chat": 1}, refuse)

    asyncio.run(run())
    client.r.get("shallow:stop-watching")
    watcher.join(10)
    job_id, where = seen["spawned"]
    assert client.queue.fetch_job(job_id) is not None  # enqueued under the id chosen first
    owed = {p.job_id: p.where for p in deliveries.pending.all()}
    assert owed == {job_id: dict(where)} and where["chat"] == 1 and "session_id" in where
    assert len(refused) == 2 and "empty" in refused[0] and "still writing" in refused[1]
    # the server's order: the record, then the job's transaction, with the record's second value inside it
    first = next(i for i, c in enumerate(commands) if c.startswith("HSET shallow:pending:test " + job_id))
    multi = next(i for i, c in enumerate(commands) if c == "MULTI" and i > first)
    job = next(i for i, c in enumerate(commands) if c.startswith(f"HSET rq:job:{job_id}"))
    second = next(i for i, c in enumerate(commands) if c.startswith("HSET shallow:pending:test " + job_id) and i > first)
    exec_ = next(i for i, c in enumerate(commands) if c == "EXEC" and i > multi)
    assert first < multi < job < exec_ and multi < second < exec_, commands
    assert "session_id" in commands[second] and "session_id" not in commands[first]


def test_a_turns_records_are_written_off_the_bots_loop(redis_proc, tmp_path):
    """A bot serves every channel from one asyncio loop: a Redis round trip made from it stops every other
    channel's events while it waits. Here Redis holds every write for 0.6 s (CLIENT PAUSE) while a turn is
    submitted, and the loop must go on running meanwhile: the turn, its owed record with it, is written from a
    worker thread. (With the record written from the loop, as before session 21, the loop stood still 0.6 s.)"""
    import time
    from dataclasses import replace

    from bots.streaming import Deliveries
    from shared.client import Turn, TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    deliveries = Deliveries(client, "test", surface_for=lambda where: None)
    spawned: list[str] = []
    refused: list[str] = []

    async def refuse(text: str) -> None:
        refused.append(text)

    async def run() -> float:
        deliveries._spawn = lambda job_id, where: spawned.append(job_id)  # no follower here
        gaps: list[float] = []
        submitted = asyncio.Event()

        async def tick() -> None:
            last = time.monotonic()
            while not submitted.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        client.r.execute_command("CLIENT", "PAUSE", 600, "WRITE")
        paused = time.monotonic()
        await deliveries.submit(Turn("say", "test:paused", "hello"), {"chat": 9}, refuse)
        assert time.monotonic() - paused >= 0.5  # the pause held the writes
        submitted.set()
        await ticker
        return max(gaps)

    worst = asyncio.run(run())
    assert spawned and not refused
    assert {p.job_id for p in deliveries.pending.all()} == set(spawned)
    assert worst < 0.3, f"the bot's loop stood still {worst:.2f} s while the turn's records were written"


def test_turns_that_arrive_while_others_are_on_their_way_go_to_redis_together(redis_proc, tmp_path):
    """A bot's burst of turns costs a few round trips, not two a turn: while one turn's are held in Redis (CLIENT
    PAUSE WRITE, 0.5 s) 24 more arrive from other channels, one of them empty; they go together, in one
    transaction (before session 23, each turn had one of its own: 25 here). Each turn still ends on its own:
    the empty one refused, the rest enqueued and owed."""
    from dataclasses import replace

    from bots.streaming import Deliveries
    from shared.client import Turn, TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    client.say("test:warm", "hello")  # RQ reads the server's version once per queue, on its first job
    deliveries = Deliveries(client, "test", surface_for=lambda where: None)
    spawned: dict[int, str] = {}
    refused: list[str] = []

    async def run() -> None:
        deliveries._spawn = lambda job_id, where: spawned.setdefault(where["chat"], job_id)  # no follower here

        async def one(i: int, text: str) -> str | None:
            async def refuse(message: str) -> None:
                refused.append(message)

            return await deliveries.submit(Turn("say", f"test:burst{i}", text), {"chat": i}, refuse)

        client.r.config_resetstat()
        client.r.execute_command("CLIENT", "PAUSE", 500, "WRITE")
        first = asyncio.create_task(one(0, "hello"))
        await asyncio.sleep(0.2)  # its round trips are held: the others queue behind them
        rest = [one(i, "   " if i == 13 else f"hello {i}") for i in range(1, 25)]
        ids = await asyncio.gather(first, *rest)
        assert ids[13] is None and all(ids[i] == spawned[i] for i in range(25) if i != 13)

    asyncio.run(run())
    assert client.r.info("commandstats")["cmdstat_exec"]["calls"] == 2
    assert len(refused) == 1 and "empty" in refused[0]
    assert sorted(spawned) == [i for i in range(25) if i != 13]
    assert {p.job_id for p in deliveries.pending.all()} == set(spawned.values())
    assert all(client.queue.fetch_job(job_id) is not None for job_id in spawned.values())


def test_replies_that_end_together_are_owed_no_more_in_one_command(redis_proc, tmp_path):
    """A bot's replies that end at the same time (a burst of channels answered together) have their owed records
    removed together: while the first one's removal is held in Redis (CLIENT PAUSE WRITE, 0.6 s), the 39 others end,
    and their records go in one HDEL after it: 2 in all (before session 24, one round trip each from a pool thread:
    40). Every record goes, and each reply is told to its surface once."""
    from dataclasses import replace

    from bots.streaming import Deliveries
    from shared.client import TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    failed: list[str] = []

    class Surface:
        def __init__(self, where: dict) -> None:
            self.chat = where["chat"]

        async def show(self, text: str) -> None: ...
        async def typing(self) -> None: ...
        async def finish(self, done) -> None: ...
        async def fail(self, message: str, partial: str) -> None:
            if not failed:  # the first reply to end: Redis holds its writes (the owed record's removal) a while
                client.r.execute_command("CLIENT", "PAUSE", 600, "WRITE")
            failed.append(self.chat)

    deliveries = Deliveries(client, "test", surface_for=Surface)
    n = 40

    async def run() -> None:
        for i in range(n):  # replies whose jobs are gone: each delivery ends by saying so
            deliveries.pending.add(f"lost-{i}", {"chat": i})
        client.r.config_resetstat()
        assert deliveries.resume() == n
        await asyncio.wait_for(asyncio.gather(*deliveries.tasks), 30)

    asyncio.run(run())
    assert sorted(failed) == list(range(n))
    assert deliveries.pending.all() == []
    assert client.r.info("commandstats")["cmdstat_hdel"]["calls"] == 2


def test_a_delivery_cancelled_as_the_bot_stops_leaves_its_reply_owed(redis_proc, tmp_path):
    """A bot that stops cancels what it was delivering: those replies are not delivered, so they stay owed, and
    the bot delivers them when it is back. One that ends (here: its job is found lost) is owed no more."""
    from dataclasses import replace

    from bots.streaming import Deliveries
    from shared.client import TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    failed: list[str] = []

    class Surface:
        async def show(self, text: str) -> None: ...
        async def typing(self) -> None: ...
        async def finish(self, done) -> None: ...
        async def fail(self, message: str, partial: str) -> None:
            failed.append(message)

    deliveries = Deliveries(client, "test", surface_for=lambda where: Surface())

    async def run() -> None:
        for job_id in ("stopped-job", "lost-job"):
            deliveries.pending.add(job_id, {"chat": 1})
        assert deliveries.resume() == 2
        await asyncio.sleep(0.2)
        stopped = [t for t in deliveries.tasks if t.get_name() == "deliver-stopped-"]  # its first 8 characters
        assert len(stopped) == 1
        stopped[0].cancel()
        await asyncio.wait_for(asyncio.gather(*deliveries.tasks, return_exceptions=True), 30)

    asyncio.run(run())
    assert failed and "lost" in failed[0]  # the other one ended, said so
    assert [p.job_id for p in deliveries.pending.all()] == ["stopped-job"]


def test_a_bots_loop_runs_a_burst_of_redis_calls_at_once():
    """The bots widen their loop's thread pool as they start: 40 turns' blocking calls run at the same time
    (asyncio's default pool, the CPU count + 4 threads, would hold all but a few of them back)."""
    import threading

    from bots.streaming import REDIS_THREADS, prepare_bot_loop

    n = 40
    assert n <= REDIS_THREADS
    together = threading.Barrier(n, timeout=10)  # broken (an error) unless all n wait in it at once

    async def run() -> list[int]:
        prepare_bot_loop()
        return await asyncio.gather(*(asyncio.to_thread(together.wait) for _ in range(n)))

    import sys

    before = sys.getswitchinterval()
    try:
        assert sorted(asyncio.run(run())) == list(range(n))
        assert sys.getswitchinterval() == 0.001  # the lock handed over every 1 ms, as the worker does
    finally:
        sys.setswitchinterval(before)


def test_the_waiting_notice_counts_the_messages_ahead():
    from bots.streaming import waiting_text
    from shared.client import Waiting

    assert waiting_text(Waiting(position=1, workers=1)) == "⏳ Queued: you are next."
    assert waiting_text(Waiting(position=3, workers=1)) == "⏳ Queued: 2 ahead of you."
    assert "No worker is running" in waiting_text(Waiting(position=3, workers=0))


def test_a_follower_cancelled_while_it_wakes_the_hub_leaves_no_subscription(redis_proc, tmp_path):
    """A reply's follower that joins a hub blocked in its read wakes it with a write; a bot stopping cancels the
    follower. Here Redis holds every write (CLIENT PAUSE) while the follower wakes the hub, and the follower is
    cancelled meanwhile: once the write goes through, the hub must not follow that stream any more. (Before
    session 22 the whole subscribe ran in a worker thread, which a cancel did not stop: the stream stayed followed.)"""
    import time
    from dataclasses import replace

    import redis as redis_py

    from shared.client import TurnClient
    from shared.protocol import stream_key
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    admin = redis_py.Redis.from_url(redis_proc.url)

    async def run() -> None:
        async def follow(job_id: str) -> None:
            async for _ in client.follow_async(job_id, poll=5):
                pass

        first = asyncio.create_task(follow("first"))  # the hub starts, then blocks in its read with this stream
        deadline = time.monotonic() + 5
        while not client.hub.asleep:
            assert time.monotonic() < deadline, "the hub never blocked in a read"
            await asyncio.sleep(0.01)
        admin.execute_command("CLIENT", "PAUSE", 800, "WRITE")  # the wake-up's XADD waits 0.8 s
        second = asyncio.create_task(follow("second"))
        await asyncio.sleep(0.2)  # joined, and waking the hub
        assert stream_key("second").encode() in client.hub.subs
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await asyncio.to_thread(time.sleep, 1.0)  # the pause ends and the wake-up's write goes through
        assert stream_key("second").encode() not in client.hub.subs, "a cancelled follower left its stream followed"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")


def test_group_commit_batches_what_waits_and_ends_each_item_on_its_own():
    """`GroupCommit` (the bots' enqueue and their delivered replies' records): a lone item goes at once; the items
    that arrive while a batch is out make the next batches, at most `size` each; one item's own error reaches only
    its caller; a failure of a whole batch reaches each of its callers and not the next batch's; a caller that is
    cancelled while its batch is out does not stop the others."""
    import threading

    from bots.streaming import GroupCommit

    release = threading.Event()
    batches: list[list[int]] = []

    def run(items: list[int]) -> list:
        batches.append(list(items))
        if items[0] == 0:
            release.wait(10)  # the first batch is held in "Redis" while the others arrive
        if 13 in items:
            raise ConnectionError("the batch with 13 failed")
        return [ValueError(f"bad {i}") if i == 7 else i * 10 for i in items]

    commit = GroupCommit(run, 4, "test")

    async def main() -> list:
        first = asyncio.create_task(commit.put(0))
        await asyncio.sleep(0.1)
        rest = [asyncio.create_task(commit.put(i)) for i in range(1, 15)]
        await asyncio.sleep(0.1)
        rest[1].cancel()  # item 2, waiting for the sender
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    assert batches[0] == [0]
    # item 2, whose caller left before it was sent, is not sent
    assert [len(b) for b in batches[1:]] == [4, 4, 4, 1] and sorted(sum(batches[1:], [])) == [1, *range(3, 15)]
    for i, result in enumerate(results):
        if i == 2:
            assert isinstance(result, asyncio.CancelledError)
        elif i == 7:
            assert isinstance(result, ValueError) and str(result) == "bad 7"
        elif any(13 in b and i in b for b in batches):
            assert isinstance(result, ConnectionError)
        else:
            assert result == i * 10, (i, result)
    assert commit._sender is None and commit._waiting == []  # nothing left behind; the next put starts a sender


def test_group_commit_stopped_with_the_bot_cancels_what_waits():
    """When the bot stops, its loop's tasks are cancelled, the sender among them: the batch that was out and the
    items that waited behind it end cancelled (their callers see CancelledError, as any task of a stopping bot),
    none hangs, and a later put still goes."""
    import threading

    from bots.streaming import GroupCommit

    held = threading.Event()

    def run(items: list[str]) -> list[str]:
        if "held" in items:
            held.wait(1)
        return [item.upper() for item in items]

    commit = GroupCommit(run, 8, "test")

    async def main() -> tuple[list, str]:
        out = [asyncio.create_task(commit.put("held"))]
        await asyncio.sleep(0.05)
        out += [asyncio.create_task(commit.put(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        commit._sender.cancel()  # what stopping the bot's loop does to it
        ended = await asyncio.wait_for(asyncio.gather(*out, return_exceptions=True), 5)
        held.set()
        return ended, await asyncio.wait_for(commit.put("later"), 5)

    ended, later = asyncio.run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in ended), ended
    assert later == "LATER"


def test_cooldowns_of_messages_that_arrive_together_are_checked_together(redis_proc):
    """A bot checks each message's per-user cooldown off its loop, the messages that arrive together in one round
    trip: here 30 messages of 20 users while the first check is held in Redis (CLIENT PAUSE WRITE): 2 round trips in
    all (a pool thread and a round trip each, as before session 24: 30). Each user's first message may go (its
    cooldown starts), their second in the same burst gets the time left; no cooldown (0 s) lets everything through."""
    import redis as redis_py

    from bots.streaming import Cooldowns
    from tests.round_trips import round_trips

    r = redis_py.Redis.from_url(redis_proc.url)
    cooldowns = Cooldowns(r, "test:cool:", 30.0)

    async def main() -> list[float]:
        first = asyncio.create_task(cooldowns.left(0))
        r.execute_command("CLIENT", "PAUSE", 300, "WRITE")
        with round_trips(r) as sent:
            await asyncio.sleep(0.1)  # the first check goes, and is held
            rest = [asyncio.create_task(cooldowns.left(i % 20)) for i in range(1, 30)]
            waits = await asyncio.gather(first, *rest)
        assert len(sent) == 2, len(sent)
        return waits

    waits = asyncio.run(main())
    assert waits[:20] == [0.0] * 20  # users 0-19, each their first message
    assert all(28 < w <= 30 for w in waits[20:]), waits[20:]  # users 0-9 again: their cooldown runs
    assert sorted(int(k.rsplit(b":", 1)[1]) for k in r.keys("test:cool:*")) == list(range(20))
    assert asyncio.run(Cooldowns(r, "test:cool:", 0).left(5)) == 0.0
    assert asyncio.run(cooldowns.left(None)) == 0.0  # no user (a channel post): nothing to cool


def test_group_commit_outlives_a_loop_closed_under_it():
    """A loop closed while its sender had a batch out (without cancelling its tasks) leaves that sender and its items
    behind: a put from a new loop starts a sender of its own and gets its result, the old loop's items are not sent."""
    import threading

    from bots.streaming import GroupCommit

    release = threading.Event()
    sent: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        sent.append(list(items))
        if "first" in items:
            release.wait(5)
        return [item.upper() for item in items]

    commit = GroupCommit(run, 8, "test")
    old = asyncio.new_event_loop()

    async def start() -> None:
        old.create_task(commit.put("first"))
        await asyncio.sleep(0.05)  # its batch is out
        old.create_task(commit.put("behind"))  # waits behind it in the old loop
        await asyncio.sleep(0)

    old.run_until_complete(start())
    old.close()  # with the sender and both puts still pending
    release.set()
    assert asyncio.run(asyncio.wait_for(commit.put("new"), 5)) == "NEW"
    assert ["new"] in sent and not any("behind" in batch for batch in sent)
