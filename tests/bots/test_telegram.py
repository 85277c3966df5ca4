"""The Telegram bot end to end: the real python-telegram-bot `Application` in a `shallow telegram` process,
talking to a fake Bot API on 127.0.0.1, with a real redis-server, a real worker process and SmolLM2."""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from bots.streaming import WRITING_MARK
from shared.client import TurnClient
from shared.protocol import Mode
from tests.bots.fake_telegram import FakeTelegram
from tests.conftest import Env, Processes, RedisProc, launch_worker, wait_for

pytestmark = pytest.mark.slow

TOKEN = "123456:TEST-token"
OTHER_TOKEN = "654321:allowlisted-bot"
BOT_ID = 999


@dataclass
class Stack:
    fake: FakeTelegram
    env: Env
    procs: Processes
    client: TurnClient
    bot: object = None

    def start_bot(self, token: str = TOKEN, name: str = "bot", **env: str):
        before = len(self.fake.calls_of("getUpdates"))
        proc = self.procs.start(["telegram"], self.env.vars(TELEGRAM_BOT_TOKEN=token, **env), name)

        def polling():
            if proc.poll() is not None:
                raise AssertionError(proc.log_path.read_text()[-3000:])
            return any(c.token == token for c in self.fake.calls_of("getUpdates")[before:])

        wait_for(polling, 60, "the bot to poll for updates")
        if token == TOKEN:
            self.bot = proc
        return proc

    def settled(self, chat_id: int) -> bool:
        """No reply in flight in the chat and none owed by the bot."""
        return self.client.store.turn_in_flight(f"telegram:{chat_id}") is None and not self.client.r.hlen("shallow:pending:telegram")

    def wait_settled(self, chat_id: int, timeout: float = 180) -> None:
        wait_for(lambda: self.settled(chat_id), timeout, f"the reply in chat {chat_id} to be delivered", interval=0.2)

    def last_bot_message(self, chat_id: int) -> dict:
        return self.fake.bot_messages(chat_id)[-1]

    def reply_to(self, chat_id: int, text: str, **kw) -> dict:
        """Send a message and wait for the bot to deliver its reply; the bot's last message."""
        n = len(self.fake.bot_messages(chat_id))
        self.fake.send(TOKEN, chat_id, text, **kw)

        def final():
            msgs = self.fake.bot_messages(chat_id)[n:]
            return (msgs and not msgs[-1]["text"].startswith("⏳") and not msgs[-1]["text"].endswith(WRITING_MARK)
                    and self.settled(chat_id))

        wait_for(final, 180, f"the reply in chat {chat_id}", interval=0.2)
        return self.last_bot_message(chat_id)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("telegram")
    redis = RedisProc(tmp / "redis")
    fake = FakeTelegram()
    fake.add_bot(TOKEN, BOT_ID, "shallow_test_bot")
    fake.add_bot(OTHER_TOKEN, BOT_ID + 1, "allowlisted_bot")
    procs = Processes(tmp)
    redis.start()
    fake.start()
    try:
        env = Env(redis=redis, model=model_dir, home=tmp / "home", extra={
            "TELEGRAM_BASE_URL": fake.base_url, "TELEGRAM_COOLDOWN": "0", "SHALLOW_MAX_NEW_TOKENS": "40",
        })
        launch_worker(procs, env.vars(), "tg-worker", redis.client())
        s = Stack(fake=fake, env=env, procs=procs, client=TurnClient(env.settings()))
        s.start_bot()
        yield s
    finally:
        procs.stop_all()
        fake.stop()
        redis.stop()


def test_startup_registers_the_commands(stack):
    names = [c["command"] for c in stack.fake.bots[TOKEN].commands]
    assert names == ["story", "end", "chat", "reset", "cancel", "status", "help"]
    assert stack.fake.calls_of("getMe") and stack.fake.calls_of("deleteWebhook")


def test_a_story_game_with_buttons_and_free_text(stack, tmp_path):
    chat = 1001
    first = stack.reply_to(chat, "/story The Lost Crown")
    keyboard = first["reply_markup"]["inline_keyboard"]
    assert 2 <= len(keyboard) <= 4
    story = stack.client.store.get(f"telegram:{chat}", Mode.STORY)
    assert story.title == "The Lost Crown" and len(story.choices) == len(keyboard)
    assert first["text"].endswith(f"{len(story.choices)}. {story.choices[-1]}")
    assert keyboard[1][0]["callback_data"] == f"s:{story.id}:1:2"

    # pressing a button: answered, the old keyboard removed with the choice noted, the story goes on
    n_before = len(stack.fake.bot_messages(chat))
    query = stack.fake.press(TOKEN, chat, first["message_id"], keyboard[1][0]["callback_data"])
    wait_for(lambda: any(c.params.get("callback_query_id") == query for c in stack.fake.calls_of("answerCallbackQuery")), 10,
             "the button press to be answered")
    wait_for(lambda: len(stack.fake.bot_messages(chat)) > n_before, 30, "the next passage's placeholder")
    stack.wait_settled(chat)
    old = stack.fake.messages[(chat, first["message_id"])]
    assert "reply_markup" not in old and old["text"].endswith(f"▶ 2. {story.choices[1]}")
    second = stack.last_bot_message(chat)
    assert second["reply_markup"]["inline_keyboard"]
    history = stack.client.store.history(f"telegram:{chat}", Mode.STORY)
    assert history[2] == {"role": "user", "content": "2"} and history[3]["content"] == second["text"]

    # typing an action continues it too
    third = stack.reply_to(chat, "I put on the crown and look into the mirror")
    assert third["text"] and len(stack.client.store.history(f"telegram:{chat}", Mode.STORY)) == 6

    transcript = stack.fake.transcript(chat)
    Path(os.environ.get("SHALLOW_TRANSCRIPT_DIR", tmp_path)).joinpath("telegram-story.txt").write_text(transcript)
    assert "user> /story The Lost Crown" in transcript and "▶ 2." in transcript

    # /end, then a button of the ended story says so and is removed
    assert stack.reply_to(chat, "/end")["text"] == 'The story "The Lost Crown" has ended. /story starts a new one.'
    second_buttons = second["reply_markup"]["inline_keyboard"]
    stack.fake.press(TOKEN, chat, second["message_id"], second_buttons[0][0]["callback_data"])
    wait_for(lambda: any("has ended" in str(c.params.get("text")) for c in stack.fake.calls_of("answerCallbackQuery")), 10,
             "the stale button to be answered")
    wait_for(lambda: "reply_markup" not in stack.fake.messages[(chat, second["message_id"])], 10, "the stale keyboard to go")


def test_story_without_a_title_asks_for_one(stack):
    chat = 1002
    assert "What should the story be called?" in stack.reply_to(chat, "/story")["text"]
    assert "limit is 100" in stack.reply_to(chat, "T" * 150)["text"]  # still waiting for a good title
    reply = stack.reply_to(chat, "The Clockwork Forest")
    assert reply.get("reply_markup")
    assert stack.client.store.get(f"telegram:{chat}", Mode.STORY).title == "The Clockwork Forest"


def test_chat_streams_with_paced_edits_and_survives_flood_control(stack):
    chat = 1003
    stack.fake.fail_next("editMessageText", retry_after=2, times=2)
    final = stack.reply_to(chat, "Write a short poem about the sea, please.")
    history = stack.client.store.history(f"telegram:{chat}", Mode.CHAT)
    assert final["text"] == history[-1]["content"]  # the full text arrived despite the 429s
    edits = [c for c in stack.fake.calls_of("editMessageText", chat) if c.params.get("message_id") == final["message_id"]]
    progress = [c.at for c in edits if str(c.params["text"]).endswith(WRITING_MARK)]
    assert progress, "no streaming edit was made"
    gaps = [b - a for a, b in zip(progress, progress[1:])]
    assert all(g >= 0.95 for g in gaps), gaps  # at most one edit a second
    assert any(c.method == "sendChatAction" for c in stack.fake.calls_of("sendChatAction", chat))


def test_reset_and_commands(stack):
    chat = 1004
    assert stack.reply_to(chat, "/reset")["text"] == "There was nothing to forget here yet."
    stack.reply_to(chat, "Hello!")
    assert stack.reply_to(chat, "/reset")["text"] == "Done: I've forgotten our conversation and any story."
    assert stack.client.store.history(f"telegram:{chat}", Mode.CHAT) == []
    assert "Workers alive: 1" in stack.reply_to(chat, "/status")["text"]
    assert "I don't know that command." in stack.reply_to(chat, "/dance")["text"]
    assert "/story <title>" in stack.reply_to(chat, "/help")["text"]
    assert stack.reply_to(chat, "/cancel")["text"] == "Nothing is being written right now."


def test_cancel_mid_reply(stack):
    chat = 1005
    stack.fake.send(TOKEN, chat, "Tell me a long story about a lighthouse keeper.")
    wait_for(lambda: any(str(m.get("text", "")).endswith(WRITING_MARK) for m in stack.fake.bot_messages(chat)), 120,
             "the reply to start streaming")
    stack.fake.send(TOKEN, chat, "/cancel")
    stack.wait_settled(chat)
    texts = [m["text"] for m in stack.fake.bot_messages(chat)]
    assert "Stopping the reply." in texts
    reply = next(t for t in texts if t.endswith("(stopped)"))
    history = stack.client.store.history(f"telegram:{chat}", Mode.CHAT)
    assert reply == history[-1]["content"] + "\n\n(stopped)"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_reply_interrupted_by_a_bot_restart_is_delivered_after_it(stack, sig):
    """Killed, or stopped as `docker compose restart` stops it (SIGTERM: the bot's shutdown must not drop the record
    of what it owes), the bot delivers the reply it was writing once it is back."""
    chat = 1006 if sig == signal.SIGKILL else 1066
    stack.fake.send(TOKEN, chat, "Describe a sunrise over the mountains.")
    wait_for(lambda: stack.fake.bot_messages(chat), 30, "the placeholder")
    placeholder = stack.fake.bot_messages(chat)[0]["message_id"]
    # owed and enqueued (the record gains its session once the job is in the queue; a bot killed before
    # that says the reply was lost, which is not what this test is about)
    wait_for(lambda: [json.loads(v)["where"].get("session_id") for v in stack.client.r.hvals("shallow:pending:telegram")] not in ([], [None]),
             30, "the reply recorded as owed and its job enqueued")
    stack.procs.kill(stack.bot, sig)  # mid-reply: the worker goes on writing
    stack.start_bot()
    stack.wait_settled(chat)
    history = stack.client.store.history(f"telegram:{chat}", Mode.CHAT)
    assert stack.fake.messages[(chat, placeholder)]["text"] == history[-1]["content"]


def test_two_chats_at_once(stack):
    a, b = 1007, 1008
    stack.fake.send(TOKEN, a, "My name is Ada.")
    stack.fake.send(TOKEN, b, "My name is Bob.")
    wait_for(lambda: stack.fake.bot_messages(a) and stack.fake.bot_messages(b), 30, "both placeholders")
    stack.wait_settled(a)
    stack.wait_settled(b)
    ha = stack.client.store.history(f"telegram:{a}", Mode.CHAT)
    hb = stack.client.store.history(f"telegram:{b}", Mode.CHAT)
    assert ha[0]["content"] == "My name is Ada." and hb[0]["content"] == "My name is Bob."
    assert stack.last_bot_message(a)["text"] == ha[1]["content"]
    assert stack.last_bot_message(b)["text"] == hb[1]["content"]


def test_one_turn_at_a_time_gets_a_notice(stack):
    chat = 1009
    stack.fake.send(TOKEN, chat, "Tell me about volcanoes.")
    wait_for(lambda: stack.client.store.turn_in_flight(f"telegram:{chat}"), 30, "the first turn")
    stack.fake.send(TOKEN, chat, "And earthquakes?")
    stack.wait_settled(chat)
    wait_for(lambda: any("still writing" in m["text"] for m in stack.fake.bot_messages(chat)), 30, "the busy notice")
    assert len(stack.client.store.history(f"telegram:{chat}", Mode.CHAT)) == 2


def test_bad_input_gets_short_answers(stack):
    chat = 1010
    stack.fake.send_sticker(TOKEN, chat)
    wait_for(lambda: stack.fake.bot_messages(chat), 30, "the sticker answer")
    assert stack.last_bot_message(chat)["text"] == "I can only read text messages. Please write what you want to say."
    stack.fake.send_photo(TOKEN, chat)
    wait_for(lambda: len(stack.fake.bot_messages(chat)) == 2, 30, "the photo answer")
    assert "only read text" in stack.last_bot_message(chat)["text"]
    assert "limit is 2000" in stack.reply_to(chat, "x" * 2500)["text"]
    assert "limit is 100" in stack.reply_to(chat, "/story " + "T" * 120)["text"]
    assert stack.client.queue.count == 0 and stack.client.store.history(f"telegram:{chat}", Mode.CHAT) == []


def test_groups_answer_mentions_and_replies_only(stack):
    group = -2001
    stack.fake.send(TOKEN, group, "just people talking", user_id=5, chat_type="group")
    reply = stack.reply_to(group, "@shallow_test_bot what is a crown?", user_id=5, chat_type="group")
    assert stack.client.store.history(f"telegram:{group}", Mode.CHAT)[0]["content"] == "what is a crown?"
    stack.reply_to(group, "tell me more", user_id=6, chat_type="group", reply_to=reply["message_id"])
    history = stack.client.store.history(f"telegram:{group}", Mode.CHAT)
    assert [m["content"] for m in history[::2]] == ["what is a crown?", "tell me more"]


def test_outside_the_allowlist_is_refused_once_and_the_cooldown_holds(stack):
    stack.start_bot(OTHER_TOKEN, name="allowlisted", TELEGRAM_ALLOWED_CHATS="3001", TELEGRAM_COOLDOWN="30")
    stack.fake.send(OTHER_TOKEN, 3002, "hello?")
    wait_for(lambda: stack.fake.bot_messages(3002), 30, "the refusal")
    assert stack.last_bot_message(3002)["text"] == "Sorry, this bot is not open to this chat. Ask its owner to add you."
    stack.fake.send(OTHER_TOKEN, 3002, "hello again?")
    stack.fake.send(OTHER_TOKEN, 3001, "/help")  # an allowed chat, sent after: once it is answered, 3002's second was seen
    wait_for(lambda: stack.fake.bot_messages(3001), 30, "the allowed chat's answer")
    assert len(stack.fake.bot_messages(3002)) == 1

    # the per-user cooldown: a second message right after the first gets a notice, not a turn
    stack.fake.send(OTHER_TOKEN, 3001, "Hello there")
    stack.fake.send(OTHER_TOKEN, 3001, "Hello again")
    wait_for(lambda: any(m["text"].startswith("One moment: you can send your next message in") for m in stack.fake.bot_messages(3001)),
             30, "the cooldown notice")
    stack.wait_settled(3001)
    assert [m["content"] for m in stack.client.store.history("telegram:3001", Mode.CHAT)][::2] == ["Hello there"]
