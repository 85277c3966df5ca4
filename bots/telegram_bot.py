"""`shallow telegram`: chat and /story on Telegram (python-telegram-bot 22), over the shared worker.

Each turn: validate, post a placeholder at once, enqueue the job, then edit the placeholder as the
reply streams in (at most once a second, honouring flood control), and finish with the full text split
at 4096 characters, story choices as an inline keyboard. Replies still owed are kept in Redis, so a bot
that restarts delivers them.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from telegram import BotCommand, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, RetryAfter, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bots.streaming import (Cooldowns, Deliveries, GroupCommit, first_time, ids_from_env, prepare_bot_loop, split_text,
                            status_lines, story_and_turn)
from shared.client import Turn, TurnClient
from shared.errors import BadInput, ConfigError
from shared.protocol import Done, Mode
from shared.sessions import Session
from shared.settings import Settings

logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 4096  # Telegram's limit on one message's text
BUTTON_LIMIT = 60  # longer button labels are cut; the full choice is in the passage above them
AWAIT_TITLE_TTL = 600  # how long "/story" without a title waits for the title

HELP = (
    "I'm a chat bot with a storyteller inside.\n\n"
    "/story <title> — start a choose-your-own-adventure (e.g. /story The Lost Crown); press a button or type what you do\n"
    "/end — end the story\n"
    "/chat — chat with me (a running story is kept; /story brings it back)\n"
    "/reset — forget our conversation and any story\n"
    "/cancel — stop the reply I'm writing\n"
    "/status — the queue and the workers\n"
    "/help — this text\n\n"
    "In private chats, just write. In groups, mention me or reply to my messages."
)
COMMANDS = [
    ("story", "Start a choose-your-own-adventure: /story <title>"),
    ("end", "End the story"),
    ("chat", "Chat (the story is kept)"),
    ("reset", "Forget this conversation"),
    ("cancel", "Stop the reply being written"),
    ("status", "Queue position and workers"),
    ("help", "How to use this bot"),
]


@dataclass(frozen=True)
class TelegramSettings:
    token: str
    base_url: str = "https://api.telegram.org/bot"  # a local Bot API server or a test server goes here
    allowed_chats: frozenset[int] = field(default_factory=frozenset)  # empty: every chat
    allowed_users: frozenset[int] = field(default_factory=frozenset)  # empty: every user
    cooldown: float = 2.0  # seconds between one user's turns: enough to stop a flood, not a conversation

    @classmethod
    def from_env(cls) -> TelegramSettings:
        token = os.environ.get("TELEGRAM_BOT_TOKEN", "").strip()
        if not token:
            raise ConfigError("TELEGRAM_BOT_TOKEN is not set: create a bot with @BotFather and put its token there.")
        try:
            cooldown = float(os.environ.get("TELEGRAM_COOLDOWN", "2") or 2)
        except ValueError:
            raise ConfigError("TELEGRAM_COOLDOWN must be a number of seconds") from None
        return cls(
            token=token,
            base_url=os.environ.get("TELEGRAM_BASE_URL", "").strip() or cls.base_url,
            allowed_chats=ids_from_env("TELEGRAM_ALLOWED_CHATS"),
            allowed_users=ids_from_env("TELEGRAM_ALLOWED_USERS"),
            cooldown=cooldown,
        )


def _seconds(retry: RetryAfter) -> float:
    value = retry.retry_after
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


def choice_keyboard(session_id: str, turn: int, choices: list[str]) -> InlineKeyboardMarkup:
    """One button per choice; the data names the story and passage, so a stale button can be told apart."""
    rows = []
    for n, choice in enumerate(choices, 1):
        label = f"{n}. {choice}"
        if len(label) > BUTTON_LIMIT:
            label = label[: BUTTON_LIMIT - 1] + "…"
        rows.append([InlineKeyboardButton(label, callback_data=f"s:{session_id}:{turn}:{n}")])
    return InlineKeyboardMarkup(rows)


class TelegramSurface:
    """A reply in a Telegram chat: the placeholder message, edited, then follow-up messages."""

    def __init__(self, bot, chat_id: int, message_id: int, keyboard: Callable[[Done], InlineKeyboardMarkup | None]) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.message_id = message_id
        self.keyboard = keyboard
        self.quiet_until = 0.0  # flood control: no progress edits before this (loop time)

    async def _call(self, make, *, must: bool):
        """Run one Bot API call; on flood control wait as told, then retry (progress edits are skipped instead)."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            try:
                return await make()
            except RetryAfter as exc:
                wait = _seconds(exc)
                logger.info("flood control in chat %s: waiting %.1fs", self.chat_id, wait)
                self.quiet_until = loop.time() + wait
                if not must:
                    return None
                await asyncio.sleep(wait)
            except BadRequest as exc:
                if "not modified" in str(exc).lower():
                    return None
                raise
        raise TelegramError("flood control did not lift after 20 tries")

    async def show(self, text: str) -> None:
        if asyncio.get_running_loop().time() < self.quiet_until:
            return
        try:
            await self._call(
                lambda: self.bot.edit_message_text(text=text[:MESSAGE_LIMIT], chat_id=self.chat_id, message_id=self.message_id),
                must=False,
            )
        except TelegramError as exc:  # a progress edit that fails is replaced by the next one
            logger.warning("progress edit in chat %s failed: %s", self.chat_id, exc)

    async def typing(self) -> None:
        try:
            await self.bot.send_chat_action(chat_id=self.chat_id, action=ChatAction.TYPING)
        except TelegramError as exc:
            logger.debug("typing in chat %s: %s", self.chat_id, exc)

    async def finish(self, done: Done) -> None:
        text = done.text or "(no reply)"
        if done.finish_reason == "cancelled":
            text += "\n\n(stopped)"
        await self._deliver(split_text(text, MESSAGE_LIMIT), self.keyboard(done))

    async def fail(self, message: str, partial: str) -> None:
        text = (partial.strip() + "\n\n" if partial.strip() else "") + f"⚠️ {message}"
        await self._deliver(split_text(text, MESSAGE_LIMIT), None)

    async def _deliver(self, parts: list[str], markup: InlineKeyboardMarkup | None) -> None:
        """The first part replaces the placeholder, the rest follow; the keyboard goes on the last."""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            kb = markup if last else None
            if i == 0:
                try:
                    await self._call(
                        lambda: self.bot.edit_message_text(
                            text=part, chat_id=self.chat_id, message_id=self.message_id, reply_markup=kb
                        ),
                        must=True,
                    )
                    continue
                except BadRequest as exc:  # the placeholder is gone (deleted): send the text anew
                    logger.warning("final edit in chat %s failed (%s); sending a new message", self.chat_id, exc)
            await self._call(lambda: self.bot.send_message(chat_id=self.chat_id, text=part, reply_markup=kb), must=True)


class TelegramBot:
    def __init__(self, settings: Settings, tg: TelegramSettings, client: TurnClient | None = None) -> None:
        self.settings = settings
        self.tg = tg
        self.client = client or TurnClient(settings)
        self.deliveries = Deliveries(self.client, "telegram", self._surface)
        self.r = self.client.r
        self.cooldowns = Cooldowns(self.r, "shallow:tg:cool:", tg.cooldown)
        self.titles = GroupCommit(self._take_titles, 256, "titles")  # the messages that arrive together: one round trip

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def channel(chat_id: int) -> str:
        return f"telegram:{chat_id}"

    def _allowed(self, update: Update) -> bool:
        chat, user = update.effective_chat, update.effective_user
        ok = (not self.tg.allowed_chats or (chat and chat.id in self.tg.allowed_chats)) and (
            not self.tg.allowed_users or (user and user.id in self.tg.allowed_users)
        )
        return bool(ok)

    async def _refuse_once(self, update: Update) -> None:
        """Outside the allowlists: say so once a day per chat, then stay quiet."""
        chat = update.effective_chat
        if chat and await asyncio.to_thread(first_time, self.r, f"shallow:tg:refused:{chat.id}"):
            await chat.send_message("Sorry, this bot is not open to this chat. Ask its owner to add you.")

    # The Redis work of the commands and buttons, blocking: each runs in a worker thread, off the loop every chat shares.

    def _resume_or_ask_title(self, chat_id: int) -> Session | None:
        """/story without a title: the paused story, resumed; or None, and the next message is awaited as the title."""
        channel = self.channel(chat_id)
        paused = self.client.store.get(channel, Mode.STORY)
        if paused and self.client.store.mode(channel) is Mode.CHAT:
            self.client.store.set_mode(channel, Mode.STORY)
            return paused
        self.r.set(f"shallow:tg:title:{chat_id}", 1, ex=AWAIT_TITLE_TTL)
        return None

    def _back_to_chat(self, channel: str) -> Session | None:
        """/chat: the channel chats again; its story (returned) is kept."""
        story = self.client.store.get(channel, Mode.STORY)
        self.client.store.set_mode(channel, Mode.CHAT)
        return story

    def _forget(self, chat_id: int) -> bool:
        """/reset: the conversation, any story and any awaited title forgotten; False when there was nothing."""
        had = self.client.reset(self.channel(chat_id))
        self.r.delete(f"shallow:tg:title:{chat_id}")
        return had

    def _what_to_cancel(self, chat_id: int) -> tuple[bool, str | None]:
        """/cancel: whether a title was awaited (it is no more), else the job writing in this chat, if any."""
        if self.r.delete(f"shallow:tg:title:{chat_id}"):
            return True, None
        return False, self.client.store.turn_in_flight(self.channel(chat_id))

    def _take_titles(self, chat_ids: list[int]) -> list[bool]:
        """Whether /story was waiting for a title in each chat (it waits no more), in one round trip."""
        with self.r.pipeline(transaction=False) as p:
            for chat_id in chat_ids:
                p.delete(f"shallow:tg:title:{chat_id}")
            return [bool(n) for n in p.execute()]

    async def _addressed(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
        """The text meant for the bot, or None: in groups only mentions and replies to the bot count."""
        msg = update.effective_message
        text = msg.text or ""
        if msg.chat.type == ChatType.PRIVATE:
            return text
        me = context.bot
        mention = f"@{me.username}" if me.username else None
        if mention and mention.lower() in text.lower():
            start = text.lower().index(mention.lower())
            return (text[:start] + text[start + len(mention) :]).strip()
        reply = msg.reply_to_message
        if reply and reply.from_user and reply.from_user.id == me.id:
            return text
        return None

    async def _gate(self, update: Update) -> bool:
        if not self._allowed(update):
            await self._refuse_once(update)
            return False
        return True

    async def _start_turn(self, message: Message, turn: Turn) -> None:
        """Placeholder at once, then the job; the reply streams into the placeholder."""
        placeholder = await message.reply_text("⏳ …")
        where = {"chat_id": placeholder.chat_id, "message_id": placeholder.message_id}
        await self.deliveries.submit(turn, where, placeholder.edit_text)

    def _surface(self, where: dict) -> TelegramSurface:
        def keyboard(done: Done) -> InlineKeyboardMarkup | None:
            return choice_keyboard(where["session_id"], where["turn"], done.choices) if done.choices and "session_id" in where else None

        return TelegramSurface(self.app.bot, where["chat_id"], where["message_id"], keyboard)

    # -- commands ---------------------------------------------------------------------------------

    async def start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/start: greet and explain."""
        if await self._gate(update):
            await update.effective_message.reply_text("Hello! " + HELP)

    async def help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/help: the commands."""
        if await self._gate(update):
            await update.effective_message.reply_text(HELP)

    async def story(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/story <title>: start an adventure; without a title, resume the paused one or ask for a title."""
        if not await self._gate(update):
            return
        msg = update.effective_message
        channel = self.channel(msg.chat_id)
        title = " ".join(context.args or [])
        if not title.strip():
            paused = await asyncio.to_thread(self._resume_or_ask_title, msg.chat_id)
            if paused:
                await msg.reply_text(f'Back to "{paused.title}". What do you do?')
                return
            await msg.reply_text("What should the story be called? Send me a title, e.g. The Lost Crown.")
            return
        try:
            self.client.clean_title(title)
        except BadInput as exc:
            await msg.reply_text(str(exc))
            return
        await self._start_turn(msg, Turn("story", channel, title, _user(update)))

    async def end(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/end: end the story."""
        if not await self._gate(update):
            return
        story = await asyncio.to_thread(self.client.end_story, self.channel(update.effective_chat.id))
        await update.effective_message.reply_text(
            f'The story "{story.title}" has ended. /story starts a new one.' if story else "There is no story running here."
        )

    async def chat(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/chat: back to chatting; a running story is kept."""
        if not await self._gate(update):
            return
        story = await asyncio.to_thread(self._back_to_chat, self.channel(update.effective_chat.id))
        note = f' The story "{story.title}" is kept: /story brings it back.' if story else ""
        await update.effective_message.reply_text("Chatting now." + note)

    async def reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/reset: forget this chat's conversation and story."""
        if not await self._gate(update):
            return
        had = await asyncio.to_thread(self._forget, update.effective_chat.id)
        await update.effective_message.reply_text(
            "Done: I've forgotten our conversation and any story." if had else "There was nothing to forget here yet."
        )

    async def cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/cancel: stop the reply being written (or the question for a title)."""
        if not await self._gate(update):
            return
        asked, job_id = await asyncio.to_thread(self._what_to_cancel, update.effective_chat.id)
        if asked:
            await update.effective_message.reply_text("All right, no story for now.")
            return
        if not job_id:
            await update.effective_message.reply_text("Nothing is being written right now.")
            return
        await asyncio.to_thread(self.client.cancel, job_id)
        await update.effective_message.reply_text("Stopping the reply.")

    async def status(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/status: this chat's place in the queue and the workers alive."""
        if not await self._gate(update):
            return
        lines = await asyncio.to_thread(status_lines, self.client, self.channel(update.effective_chat.id))
        await update.effective_message.reply_text("\n".join(lines))

    async def unknown(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """An unknown command: the help text."""
        if await self._gate(update):
            await update.effective_message.reply_text("I don't know that command.\n\n" + HELP)

    # -- messages ---------------------------------------------------------------------------------

    async def text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A text message: a chat turn, a story action, or the title that /story asked for."""
        text = await self._addressed(update, context)
        if text is None or not await self._gate(update):
            return
        msg = update.effective_message
        channel = self.channel(msg.chat_id)
        user = update.effective_user
        wait = await self.cooldowns.left(user.id if user else None)  # off the loop every chat shares, with the others'
        if wait:
            await msg.reply_text(f"One moment: you can send your next message in {wait:.0f}s.")
            return
        if await self.titles.put(msg.chat_id):
            try:
                self.client.clean_title(text)
            except BadInput as exc:
                await asyncio.to_thread(self.r.set, f"shallow:tg:title:{msg.chat_id}", 1, ex=AWAIT_TITLE_TTL)
                await msg.reply_text(f"{exc}")
                return
            await self._start_turn(msg, Turn("story", channel, text, _user(update)))
            return
        try:
            self.client.clean_text(text)
        except BadInput as exc:
            await msg.reply_text(str(exc))
            return
        await self._start_turn(msg, Turn("say", channel, text, _user(update)))

    async def not_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Stickers, photos, voice, files: explain that only text is read."""
        msg = update.effective_message
        if msg.chat.type != ChatType.PRIVATE:
            reply = msg.reply_to_message
            if not (reply and reply.from_user and reply.from_user.id == context.bot.id):
                return
        if await self._gate(update):
            await msg.reply_text("I can only read text messages. Please write what you want to say.")

    async def button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A story choice pressed: answered at once, the old keyboard removed, the story continued."""
        query = update.callback_query
        if not self._allowed(update):
            await query.answer("Sorry, this bot is not open to you.")
            return
        try:
            _, session_id, turn, n = (query.data or "").split(":")
            turn_no, choice_no = int(turn), int(n)
        except ValueError:
            await query.answer("This button is not one of mine.")
            return
        chat_id = query.message.chat_id if query.message else update.effective_chat.id
        channel = self.channel(chat_id)
        story, busy = await asyncio.to_thread(story_and_turn, self.client, channel)
        if story is None or story.id != session_id:
            await query.answer("This story has ended. Start a new one with /story <title>.", show_alert=True)
            await _drop_keyboard(query)
            return
        if story.turns != turn_no or not 1 <= choice_no <= len(story.choices):
            await query.answer("That choice belongs to an earlier passage.", show_alert=True)
            await _drop_keyboard(query)
            return
        if busy:
            await query.answer("I'm still writing; press again when the passage is done.", show_alert=True)
            return
        await query.answer(f"You chose: {story.choices[choice_no - 1]}"[:190])
        await _drop_keyboard(query, f"▶ {choice_no}. {story.choices[choice_no - 1]}")
        await asyncio.to_thread(self.client.store.set_mode, channel, Mode.STORY)
        await self._start_turn(query.message, Turn("say", channel, str(choice_no), _user(update)))

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log every handler error with its traceback; the user gets a short apology, never the traceback."""
        logger.error("error handling an update: %s", context.error, exc_info=context.error)
        if isinstance(update, Update) and update.effective_chat:
            try:
                await update.effective_chat.send_message("Sorry, something went wrong on my side. Please try again.")
            except TelegramError:
                pass

    # -- the application ----------------------------------------------------------------------------

    async def post_init(self, app: Application) -> None:
        prepare_bot_loop()  # a thread pool with room for a burst of turns, and the interpreter lock handed over every 1 ms
        await app.bot.set_my_commands([BotCommand(c, d) for c, d in COMMANDS])
        owed = self.deliveries.resume()
        if owed:
            logger.info("delivering %d replies owed from before the restart", owed)

    def build_app(self) -> Application:
        app = (
            ApplicationBuilder()
            .token(self.tg.token)
            .base_url(self.tg.base_url)
            .concurrent_updates(True)  # one chat's slow reply must not hold up the others
            .post_init(self.post_init)
            .build()
        )
        self.app = app
        for name, handler in [
            ("start", self.start), ("help", self.help), ("story", self.story), ("end", self.end), ("chat", self.chat),
            ("reset", self.reset), ("cancel", self.cancel), ("status", self.status),
        ]:
            app.add_handler(CommandHandler(name, handler))
        app.add_handler(MessageHandler(filters.COMMAND, self.unknown))
        app.add_handler(CallbackQueryHandler(self.button, pattern=r"^s:"))
        app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, self.text))
        app.add_handler(
            MessageHandler(
                filters.Sticker.ALL | filters.PHOTO | filters.VOICE | filters.AUDIO | filters.Document.ALL
                | filters.VIDEO | filters.VIDEO_NOTE | filters.ANIMATION | filters.LOCATION | filters.CONTACT,
                self.not_text,
            )
        )
        app.add_error_handler(self.on_error)
        return app


def _user(update: Update) -> str | None:
    user = update.effective_user
    return str(user.id) if user else None


async def _drop_keyboard(query, note: str | None = None) -> None:
    """Remove the buttons of a passage that has been answered (and say which choice was taken)."""
    try:
        if note and query.message and query.message.text:
            await query.edit_message_text(text=(query.message.text + "\n\n" + note)[:MESSAGE_LIMIT], reply_markup=None)
        else:
            await query.edit_message_reply_markup(reply_markup=None)
    except TelegramError as exc:
        logger.info("could not remove a keyboard: %s", exc)


def run(settings: Settings) -> int:
    # Opt in to python-telegram-bot's coming behaviour, RetryAfter.retry_after as a timedelta (_seconds reads both).
    os.environ.setdefault("PTB_TIMEDELTA", "1")
    tg = TelegramSettings.from_env()
    bot = TelegramBot(settings, tg)
    app = bot.build_app()
    logger.info("Telegram bot starting (API %s)", tg.base_url)
    app.run_polling(allowed_updates=Update.ALL_TYPES)
    return 0
