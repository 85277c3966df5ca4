"""The Discord bot end to end: the real discord.py client in a `shallow discord` process, connected to a fake
Discord (REST + gateway WebSocket) on 127.0.0.1, with a real redis-server, a real worker process and SmolLM2."""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bots.streaming import WRITING_MARK
from shared.client import TurnClient
from shared.protocol import Mode
from tests.bots.fake_discord import FakeDiscord
from tests.conftest import Env, Processes, RedisProc, launch_worker, wait_for

pytestmark = pytest.mark.slow

GUILD_CHANNEL = 700
THREAD = 701


@dataclass
class Stack:
    fake: FakeDiscord
    env: Env
    procs: Processes
    client: TurnClient
    bot: object = None

    def start_bot(self, name: str = "bot", **env: str):
        before = self.fake.identified
        proc = self.procs.start(["discord"], self.env.vars(**env), name)

        def connected():
            if proc.poll() is not None:
                raise AssertionError(proc.log_path.read_text()[-3000:])
            return self.fake.identified > before and self.fake.commands

        wait_for(connected, 60, "the bot to connect to the gateway and register its commands")
        self.bot = proc
        return proc

    def settled(self, channel_id: int) -> bool:
        return (self.client.store.turn_in_flight(f"discord:{channel_id}") is None
                and not self.client.r.hlen("shallow:pending:discord"))

    def wait_reply(self, channel_id: int, count_before: int, timeout: float = 180) -> dict:
        """The bot's last message in the channel, once it is final (not a placeholder, not still being written)."""
        def final():
            msgs = self.fake.channel_messages(channel_id, bot_only=True)[count_before:]
            return (msgs and not msgs[-1]["content"].startswith("⏳") and not msgs[-1]["content"].endswith(WRITING_MARK)
                    and self.settled(channel_id))

        wait_for(final, timeout, f"the reply in channel {channel_id}", interval=0.2)
        return self.fake.channel_messages(channel_id, bot_only=True)[-1]

    def bot_count(self, channel_id: int) -> int:
        return len(self.fake.channel_messages(channel_id, bot_only=True))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("discord")
    redis = RedisProc(tmp / "redis")
    fake = FakeDiscord()
    procs = Processes(tmp)
    redis.start()
    fake.start()
    try:
        env = Env(redis=redis, model=model_dir, home=tmp / "home", extra={
            "DISCORD_BOT_TOKEN": "fake-token", "DISCORD_API_BASE_URL": fake.api_base_url,
            "DISCORD_GATEWAY_URL": fake.gateway_url, "DISCORD_COOLDOWN": "0", "SHALLOW_MAX_NEW_TOKENS": "40",
        })
        launch_worker(procs, env.vars(), "dc-worker", redis.client())
        s = Stack(fake=fake, env=env, procs=procs, client=TurnClient(env.settings()))
        s.start_bot()
        yield s
    finally:
        procs.stop_all()
        fake.stop()
        redis.stop()


def test_startup_registers_the_slash_commands(stack):
    names = sorted(c["name"] for c in stack.fake.commands)
    assert names == ["cancel", "help", "reset", "status", "story"]
    story = next(c for c in stack.fake.commands if c["name"] == "story")
    assert sorted(o["name"] for o in story["options"]) == ["end", "start"]


def test_a_mention_streams_into_a_placeholder(stack):
    channel = GUILD_CHANNEL
    n = stack.bot_count(channel)
    stack.fake.post(channel, "what is the tallest mountain?", mention=True)
    final = stack.wait_reply(channel, n)
    history = stack.client.store.history(f"discord:{channel}", Mode.CHAT)
    assert history[0]["content"] == "what is the tallest mountain?"
    assert final["content"] == history[1]["content"]
    edits = [c for c in stack.fake.calls_to("PATCH", f"/messages/{final['id']}")]
    progress = [c.at for c in edits if c.body.get("content", "").endswith(WRITING_MARK)]
    assert progress, "no streaming edit"
    assert all(b - a >= 0.95 for a, b in zip(progress, progress[1:]))
    assert stack.fake.calls_to("POST", f"/channels/{channel}/typing")
    # other people's messages that do not mention the bot are left alone
    stack.fake.post(channel, "just chatting among ourselves", user_id=2)
    stack.fake.post(channel, "another bot mentions it", user_id=3, mention=True, author_is_bot=True)
    stack.fake.post(channel, "<@900> ping", user_id=4)  # a marker: once it is answered, the two above were seen
    stack.wait_reply(channel, n + 1)
    history = stack.client.store.history(f"discord:{channel}", Mode.CHAT)
    assert [m["content"] for m in history[::2]] == ["what is the tallest mountain?", "ping"]


def _buttons(message: dict) -> list[dict]:
    return [c for row in message.get("components", []) for c in row.get("components", [])]


def test_a_dm_is_a_chat(stack):
    dm = 800
    n = stack.bot_count(dm)
    stack.fake.post(dm, "Hello there, who are you?", user_id=11, dm=True)
    final = stack.wait_reply(dm, n)
    history = stack.client.store.history(f"discord:{dm}", Mode.CHAT)
    assert [m["content"] for m in history] == ["Hello there, who are you?", final["content"]]


def test_a_story_through_slash_commands_and_buttons(stack, tmp_path):
    channel = 702
    n = stack.bot_count(channel)
    stack.fake.slash(channel, "story", sub="start", options={"title": "The Lost Crown"})
    first = stack.wait_reply(channel, n)
    story = stack.client.store.get(f"discord:{channel}", Mode.STORY)
    buttons = _buttons(first)
    assert story.title == "The Lost Crown" and 2 <= len(buttons) == len(story.choices) <= 4
    assert buttons[0]["custom_id"] == f"story:{story.id}:1:1" and buttons[0]["label"].startswith("1. ")
    assert first["content"].endswith(f"{len(story.choices)}. {story.choices[-1]}")

    # a press is acknowledged by updating the passage (buttons gone, the choice noted), then the story goes on
    n = stack.bot_count(channel)
    press = stack.fake.press(int(first["id"]), buttons[1]["custom_id"])
    wait_for(lambda: stack.fake.responses.get(press["id"]), 10, "the press to be acknowledged")
    assert stack.fake.responses[press["id"]][0]["type"] == 7
    second = stack.wait_reply(channel, n)
    old = stack.fake.messages[int(first["id"])]
    assert not _buttons(old) and old["content"].endswith(f"▶ 2. {story.choices[1]}")
    assert _buttons(second)
    history = stack.client.store.history(f"discord:{channel}", Mode.STORY)
    assert history[2]["content"] == "2" and history[3]["content"] == second["content"]

    # a typed mention is an action too
    n = stack.bot_count(channel)
    stack.fake.post(channel, "I hide the crown under my cloak", mention=True)
    third = stack.wait_reply(channel, n)
    assert len(stack.client.store.history(f"discord:{channel}", Mode.STORY)) == 6 and third["content"]

    out = Path(os.environ.get("SHALLOW_TRANSCRIPT_DIR", tmp_path))
    out.joinpath("discord-story.txt").write_text(stack.fake.transcript(channel))
    out.joinpath("discord-mention.txt").write_text(stack.fake.transcript(GUILD_CHANNEL))

    # /story end, then a button of the ended story says so and goes away
    stack.fake.slash(channel, "story", sub="end")
    wait_for(lambda: any("has ended" in m["content"] for m in stack.fake.channel_messages(channel, bot_only=True)), 10, "/story end")
    press = stack.fake.press(int(second["id"]), _buttons(second)[0]["custom_id"])
    wait_for(lambda: any("This story has ended" in m["content"] for m in stack.fake.ephemeral(channel)), 10, "the stale press")
    assert not _buttons(stack.fake.messages[int(second["id"])])


def test_story_buttons_still_work_after_a_bot_restart(stack):
    channel = 711
    n = stack.bot_count(channel)
    stack.fake.slash(channel, "story", sub="start", options={"title": "The Sunken Bell"})
    first = stack.wait_reply(channel, n)
    stack.procs.kill(stack.bot, signal.SIGTERM)
    stack.start_bot()
    n = stack.bot_count(channel)
    press = stack.fake.press(int(first["id"]), _buttons(first)[0]["custom_id"])
    wait_for(lambda: stack.fake.responses.get(press["id"]), 10, "the press to be acknowledged by the new bot process")
    second = stack.wait_reply(channel, n)
    assert _buttons(second) and len(stack.client.store.history(f"discord:{channel}", Mode.STORY)) == 4


def test_rate_limited_edits_lose_nothing(stack):
    channel = 703
    stack.fake.rate_limit("PATCH", f"/channels/{channel}/messages", retry_after=1.5, times=2)
    n = stack.bot_count(channel)
    stack.fake.post(channel, "Name three rivers.", mention=True)
    final = stack.wait_reply(channel, n)
    assert final["content"] == stack.client.store.history(f"discord:{channel}", Mode.CHAT)[-1]["content"]
    patches = stack.fake.calls_to("PATCH", f"/channels/{channel}/messages/{final['id']}")
    assert len(patches) >= 3  # the two 429s were retried by discord.py's rate limiter


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_reply_interrupted_by_a_bot_restart_is_delivered_after_it(stack, sig):
    """Killed, or stopped as `docker compose restart` stops it (SIGTERM: the bot's shutdown must not drop the record
    of what it owes), the bot delivers the reply it was writing once it is back."""
    channel = 704 if sig == signal.SIGKILL else 766
    n = stack.bot_count(channel)
    stack.fake.post(channel, "Describe a thunderstorm at sea.", mention=True)
    wait_for(lambda: stack.bot_count(channel) > n, 30, "the placeholder")
    placeholder = stack.fake.channel_messages(channel, bot_only=True)[-1]
    # owed and enqueued (the record gains its session once the job is in the queue; a bot killed before
    # that says the reply was lost, which is not what this test is about)
    wait_for(lambda: [json.loads(v)["where"].get("session_id") for v in stack.client.r.hvals("shallow:pending:discord")] not in ([], [None]),
             30, "the reply recorded as owed and its job enqueued")
    stack.procs.kill(stack.bot, sig)
    stack.start_bot()
    wait_for(lambda: stack.settled(channel), 180, "the owed reply")
    history = stack.client.store.history(f"discord:{channel}", Mode.CHAT)
    assert stack.fake.messages[int(placeholder["id"])]["content"] == history[-1]["content"]


def test_two_channels_at_once_and_a_thread_keeps_its_own_conversation(stack):
    a, b = 705, THREAD
    na, nb = stack.bot_count(a), stack.bot_count(b)
    stack.fake.post(a, "My name is Ada.", mention=True)
    stack.fake.post(b, "My name is Bob.", mention=True, user_id=2)
    fa = stack.wait_reply(a, na)
    fb = stack.wait_reply(b, nb)
    ha = stack.client.store.history(f"discord:{a}", Mode.CHAT)
    hb = stack.client.store.history(f"discord:{b}", Mode.CHAT)
    assert [m["content"] for m in ha] == ["My name is Ada.", fa["content"]]
    assert [m["content"] for m in hb] == ["My name is Bob.", fb["content"]]
    # replying to the bot's message (no mention) continues that channel's conversation
    n = stack.bot_count(b)
    stack.fake.post(b, "What did I say my name was?", reply_to=int(fb["id"]), user_id=2)
    stack.wait_reply(b, n)
    assert len(stack.client.store.history(f"discord:{b}", Mode.CHAT)) == 4


def test_commands_and_one_turn_at_a_time(stack):
    channel = 706
    stack.fake.slash(channel, "reset")
    wait_for(lambda: stack.fake.channel_messages(channel, bot_only=True), 10, "/reset")
    assert stack.fake.channel_messages(channel, bot_only=True)[-1]["content"] == "There was nothing to forget here yet."
    n = stack.bot_count(channel)
    stack.fake.post(channel, "Tell me about volcanoes.", mention=True)
    wait_for(lambda: stack.client.store.turn_in_flight(f"discord:{channel}"), 30, "the first turn")
    stack.fake.post(channel, "And about earthquakes?", mention=True)
    stack.fake.slash(channel, "status")
    wait_for(lambda: any("Workers alive: 1" in m["content"] for m in stack.fake.ephemeral(channel)), 10, "/status")
    stack.wait_reply(channel, n)
    assert any("still writing" in m["content"] for m in stack.fake.channel_messages(channel, bot_only=True))
    assert len(stack.client.store.history(f"discord:{channel}", Mode.CHAT)) == 2
    stack.fake.slash(channel, "reset")
    wait_for(lambda: "forgotten" in stack.fake.channel_messages(channel, bot_only=True)[-1]["content"], 10, "/reset")
    assert stack.client.store.history(f"discord:{channel}", Mode.CHAT) == []
    stack.fake.slash(channel, "help")
    wait_for(lambda: any("/story start" in m["content"] for m in stack.fake.ephemeral(channel)), 10, "/help")


def test_cancel_mid_reply(stack):
    channel = 707
    n = stack.bot_count(channel)
    stack.fake.post(channel, "Tell me a long story about a lighthouse keeper.", mention=True)
    wait_for(lambda: any(m["content"].endswith(WRITING_MARK) for m in stack.fake.channel_messages(channel, bot_only=True)),
             120, "the reply to start streaming")
    stack.fake.slash(channel, "cancel")
    final = stack.wait_reply(channel, n)
    texts = [m["content"] for m in stack.fake.channel_messages(channel, bot_only=True)]
    assert "Stopping the reply." in texts
    reply = next(t for t in texts if t.endswith("(stopped)"))
    assert reply == stack.client.store.history(f"discord:{channel}", Mode.CHAT)[-1]["content"] + "\n\n(stopped)"
    assert final


def test_bad_input_gets_short_answers(stack):
    dm, channel = 801, 708
    attachment = {"id": "1", "filename": "cat.png", "size": 10, "url": "http://127.0.0.1/cat.png", "proxy_url": "x"}
    stack.fake.post(dm, "", dm=True, user_id=12, attachments=[attachment])
    wait_for(lambda: stack.fake.channel_messages(dm, bot_only=True), 10, "the attachment answer")
    assert stack.fake.channel_messages(dm, bot_only=True)[-1]["content"] == "I can only read text: attachments are not read."
    stack.fake.post(channel, "", mention=True)
    wait_for(lambda: stack.fake.channel_messages(channel, bot_only=True), 10, "the empty mention answer")
    assert "without a message" in stack.fake.channel_messages(channel, bot_only=True)[-1]["content"]
    stack.fake.post(channel, "x" * 2500, mention=True)
    wait_for(lambda: any("limit is 2000" in m["content"] for m in stack.fake.channel_messages(channel, bot_only=True)), 10,
             "the over-long answer")
    stack.fake.slash(channel, "story", sub="start", options={"title": "T" * 150})
    wait_for(lambda: any("limit is 100" in m["content"] for m in stack.fake.ephemeral(channel)), 10, "the long title answer")
    assert stack.client.queue.count == 0 and stack.client.store.history(f"discord:{channel}", Mode.CHAT) == []


def test_a_long_reply_is_split_at_2000_with_the_buttons_on_the_last_part(stack):
    import asyncio

    import discord

    from bots.discord_bot import DiscordSettings, DiscordSurface, choice_view
    from shared.protocol import Done

    channel = 709
    DiscordSettings(token="fake-token", api_base_url=stack.fake.api_base_url, gateway_url=stack.fake.gateway_url).apply()
    text = " ".join(f"word{i}" for i in range(700))  # 5,589 characters: three messages
    stack.fake.rate_limit("POST", f"/channels/{channel}/messages", retry_after=1.0)  # a 429 on a follow-up loses nothing

    async def run():
        client = discord.Client(intents=discord.Intents.none())
        await client.login("fake-token")  # REST only, against the fake
        try:
            placeholder = await client.get_partial_messageable(channel).send("⏳ …")
            surface = DiscordSurface(client, channel, placeholder.id, lambda done: choice_view("ab12", 1, done.choices))
            await surface.finish(Done(text=text, prompt_tokens=1, completion_tokens=700, choices=["Go", "Stay"]))
        finally:
            await client.close()

    asyncio.run(run())
    msgs = stack.fake.channel_messages(channel, bot_only=True)
    assert len(msgs) == 3 and all(len(m["content"]) <= 2000 for m in msgs)
    assert " ".join(m["content"] for m in msgs).split() == text.split()
    assert [b["label"] for b in _buttons(msgs[-1])] == ["1. Go", "2. Stay"] and not _buttons(msgs[0]) and not _buttons(msgs[1])


def test_outside_the_allowlist_is_refused_once_and_the_cooldown_holds(stack):
    stack.procs.kill(stack.bot, signal.SIGTERM)  # one bot on the gateway at a time
    stack.start_bot(name="allowlisted", DISCORD_ALLOWED_USERS="1", DISCORD_COOLDOWN="30")
    channel = 710
    stack.fake.post(channel, "hello?", mention=True, user_id=66)
    wait_for(lambda: stack.fake.channel_messages(channel, bot_only=True), 10, "the refusal")
    assert stack.fake.channel_messages(channel, bot_only=True)[-1]["content"] == "Sorry, this bot is not open to you here."
    stack.fake.post(channel, "hello again?", mention=True, user_id=66)
    n = stack.bot_count(channel)
    stack.fake.post(channel, "Hello there", mention=True, user_id=1)
    stack.fake.post(channel, "Hello again", mention=True, user_id=1)
    wait_for(lambda: any(m["content"].startswith("One moment") for m in stack.fake.channel_messages(channel, bot_only=True)),
             30, "the cooldown notice")
    stack.wait_reply(channel, n)
    assert sum("not open" in m["content"] for m in stack.fake.channel_messages(channel, bot_only=True)) == 1
    assert [m["content"] for m in stack.client.store.history(f"discord:{channel}", Mode.CHAT)][::2] == ["Hello there"]


def test_two_shards_answer_their_own_guilds_and_deliver_only_their_own_owed_replies(stack):
    """DISCORD_SHARD_ID of DISCORD_SHARD_COUNT: two bot processes on one token, the fake gateway sending each guild's
    events to its shard as Discord does (DMs to shard 0). Each shard answers its own guilds; killed mid-reply, each
    delivers when it is back only the replies owed in its own guilds: shard 1 alone leaves guild A's owed, and shard 0
    delivers it when it comes back."""
    stack.procs.kill(stack.bot, signal.SIGTERM)  # one bot (here: one set of shards) on the gateway at a time
    guild_a, guild_b = 500, 1 << 22  # (guild_id >> 22) % 2: shard 0, shard 1

    def start_shard(i: int):
        before = len(stack.fake.identified_shards)
        proc = stack.procs.start(["discord"], stack.env.vars(DISCORD_SHARD_ID=str(i), DISCORD_SHARD_COUNT="2"), f"shard{i}")

        def identified():
            if proc.poll() is not None:
                raise AssertionError(proc.log_path.read_text()[-3000:])
            return (i, 2) in stack.fake.identified_shards[before:]

        wait_for(identified, 60, f"shard {i} to connect to the gateway")
        return proc

    shards = [start_shard(0), start_shard(1)]
    a, b, dm = 720, 721, 830
    first = len(stack.fake.sent)
    na, nb, nd = stack.bot_count(a), stack.bot_count(b), stack.bot_count(dm)
    stack.fake.post(a, "Name a river in guild A.", mention=True, guild_id=guild_a)
    stack.fake.post(b, "Name a river in guild B.", mention=True, guild_id=guild_b, user_id=2)
    stack.fake.post(dm, "Hello from a DM.", dm=True, user_id=3)
    for channel, n in ((a, na), (b, nb), (dm, nd)):
        final = stack.wait_reply(channel, n)
        assert final["content"] == stack.client.store.history(f"discord:{channel}", Mode.CHAT)[-1]["content"]
    shards_of = {ch: {(s, c) for s, c, event, sent_to in stack.fake.sent[first:] if sent_to == str(ch) and event == "MESSAGE_CREATE"}
                 for ch in (a, b, dm)}
    assert shards_of == {a: {(0, 2)}, b: {(1, 2)}, dm: {(0, 2)}}

    # both killed while writing a reply each; the records say whose guild each is
    a2, b2 = 722, 723
    placeholders = {}
    for channel, guild in ((a2, guild_a), (b2, guild_b)):
        n = stack.bot_count(channel)
        stack.fake.post(channel, "Describe a long voyage.", mention=True, guild_id=guild, user_id=4)
        wait_for(lambda: stack.bot_count(channel) > n, 30, "the placeholder")
        placeholders[channel] = stack.fake.channel_messages(channel, bot_only=True)[-1]

    def owed() -> dict[int, dict]:  # channel id -> where its owed reply goes
        return {json.loads(v)["where"]["channel_id"]: json.loads(v)["where"] for v in stack.client.r.hvals("shallow:pending:discord")}

    wait_for(lambda: {ch for ch, w in owed().items() if w.get("session_id")} >= {a2, b2}, 30, "both replies owed and enqueued")
    assert {ch: w["guild_id"] for ch, w in owed().items()} == {a2: guild_a, b2: guild_b}
    for proc in shards:
        stack.procs.kill(proc, signal.SIGKILL)

    def delivered(channel: int) -> bool:
        history = stack.client.store.history(f"discord:{channel}", Mode.CHAT)
        shown = stack.fake.messages[int(placeholders[channel]["id"])]["content"]
        return stack.client.store.turn_in_flight(f"discord:{channel}") is None and bool(history) and shown == history[-1]["content"]

    start_shard(1)
    wait_for(lambda: delivered(b2) and set(owed()) == {a2}, 180, "shard 1 to deliver guild B's owed reply")
    time.sleep(2)  # and not guild A's: still owed, its placeholder as the killed shard left it
    assert set(owed()) == {a2} and not delivered(a2)
    start_shard(0)
    wait_for(lambda: delivered(a2) and not owed(), 180, "shard 0 to deliver guild A's owed reply")


def test_shard_settings_are_checked_and_guilds_go_to_their_shards(monkeypatch):
    from bots.discord_bot import DiscordSettings, shard_of
    from shared.errors import ConfigError

    monkeypatch.setenv("DISCORD_BOT_TOKEN", "t")
    assert (DiscordSettings.from_env().shard_id, DiscordSettings.from_env().shard_count) == (None, None)
    assert DiscordSettings.from_env().owns(123 << 22) and DiscordSettings.from_env().owns(None)
    for shard_id, count, message in (("1", "", "go together"), ("", "2", "go together"), ("x", "2", "whole numbers"),
                                     ("2", "2", "from 0 to DISCORD_SHARD_COUNT - 1 \\(1\\), not 2"), ("0", "0", "1 or more")):
        monkeypatch.setenv("DISCORD_SHARD_ID", shard_id)
        monkeypatch.setenv("DISCORD_SHARD_COUNT", count)
        with pytest.raises(ConfigError, match=message):
            DiscordSettings.from_env()
    monkeypatch.setenv("DISCORD_SHARD_ID", "1")
    monkeypatch.setenv("DISCORD_SHARD_COUNT", "3")
    dc = DiscordSettings.from_env()
    assert (dc.shard_id, dc.shard_count) == (1, 3)
    assert shard_of(4 << 22, 3) == 1 and dc.owns(4 << 22) and not dc.owns(5 << 22) and not dc.owns(None)  # DMs: shard 0's
