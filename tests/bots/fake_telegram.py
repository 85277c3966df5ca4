"""A small fake of the Telegram Bot API on 127.0.0.1, for the real python-telegram-bot to talk to.

It speaks the real wire format (form-encoded parameters with JSON values, `{"ok": ..., "result": ...}`
answers, the real error bodies including 429 with `parameters.retry_after`), keeps the messages of
each chat, and records every call so tests can read the conversation as Telegram would have seen it.
Each bot token has its own updates, so two bots can share one server.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.bots.fake_server import ThreadedServer

MESSAGE_LIMIT = 4096


@dataclass
class Call:
    token: str
    method: str
    params: dict[str, Any]
    at: float


@dataclass
class BotState:
    token: str
    bot_id: int
    username: str
    updates: list[dict] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)



class FakeTelegram(ThreadedServer):
    name = "FakeTelegram"
    def __init__(self) -> None:
        super().__init__()
        self.bots: dict[str, BotState] = {}
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], dict] = {}  # (chat_id, message_id) -> message
        self.chat_types: dict[int, str] = {}
        self.errors: dict[str, list[dict]] = {}  # method -> queued error answers
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(1)

    # -- server lifecycle -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def add_bot(self, token: str, bot_id: int, username: str) -> None:
        self.bots[token] = BotState(token, bot_id, username)

    def routes(self, app: web.Application) -> None:
        app.router.add_route("POST", "/bot{token}/{method}", self._handle)
        app.router.add_route("GET", "/bot{token}/{method}", self._handle)

    # -- what tests do ------------------------------------------------------------------------------

    def _user(self, user_id: int) -> dict:
        return {"id": user_id, "is_bot": False, "first_name": f"User{user_id}", "language_code": "en"}

    def _chat(self, chat_id: int, chat_type: str) -> dict:
        self.chat_types[chat_id] = chat_type
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = f"User{chat_id}"
        else:
            chat["title"] = f"Group {chat_id}"
        return chat

    def _push(self, token: str, update: dict) -> int:
        with self.lock:
            update["update_id"] = next(self._update_ids)
            self.bots[token].updates.append(update)
        return update["update_id"]

    def send(
        self, token: str, chat_id: int, text: str | None = None, *, user_id: int | None = None, chat_type: str = "private",
        reply_to: int | None = None, extra: dict | None = None,
    ) -> int:
        """A user's message to the bot; returns its message id."""
        user_id = user_id or chat_id
        message_id = next(self._ids)
        msg: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()), "chat": self._chat(chat_id, chat_type),
            "from": self._user(user_id),
        }
        if text is not None:
            msg["text"] = text
            if text.startswith("/"):
                msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        if reply_to is not None:
            msg["reply_to_message"] = self.messages[(chat_id, reply_to)]
        msg.update(extra or {})
        with self.lock:
            self.messages[(chat_id, message_id)] = msg
        self._push(token, {"message": msg})
        return message_id

    def send_sticker(self, token: str, chat_id: int) -> int:
        sticker = {"file_id": "CAACAgIAAx", "file_unique_id": "AgADAx", "type": "regular", "width": 512, "height": 512,
                   "is_animated": False, "is_video": False}
        return self.send(token, chat_id, extra={"sticker": sticker})

    def send_photo(self, token: str, chat_id: int) -> int:
        photo = [{"file_id": "AgACAgIAAx", "file_unique_id": "AQADAx", "width": 90, "height": 90, "file_size": 1200}]
        return self.send(token, chat_id, extra={"photo": photo})

    def press(self, token: str, chat_id: int, message_id: int, data: str, user_id: int | None = None) -> str:
        """A user presses an inline button under one of the bot's messages; returns the query id."""
        query_id = f"q{next(self._ids)}"
        with self.lock:
            message = dict(self.messages[(chat_id, message_id)])
        self._push(token, {"callback_query": {
            "id": query_id, "from": self._user(user_id or chat_id), "message": message, "chat_instance": f"ci{chat_id}",
            "data": data,
        }})
        return query_id

    def fail_next(self, method: str, retry_after: int, times: int = 1) -> None:
        """The next `times` calls of `method` get flood control (HTTP 429 with retry_after)."""
        body = {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {retry_after}",
                "parameters": {"retry_after": retry_after}}
        with self.lock:
            self.errors.setdefault(method, []).extend([body] * times)

    def bot_messages(self, chat_id: int) -> list[dict]:
        with self.lock:
            return [m for (c, _), m in sorted(self.messages.items()) if c == chat_id and m["from"].get("is_bot")]

    def calls_of(self, method: str, chat_id: int | None = None) -> list[Call]:
        with self.lock:
            calls = [c for c in self.calls if c.method == method]
        if chat_id is not None:
            calls = [c for c in calls if int(c.params.get("chat_id", 0) or 0) == chat_id]
        return calls

    def transcript(self, chat_id: int) -> str:
        """The chat as its members saw it: each message's final text, and its buttons."""
        lines = []
        with self.lock:
            msgs = [m for (c, _), m in sorted(self.messages.items()) if c == chat_id]
        for m in msgs:
            who = "bot" if m["from"].get("is_bot") else "user"
            text = m.get("text") or ("[sticker]" if "sticker" in m else "[photo]" if "photo" in m else "[?]")
            lines.append(f"{who}> {text}")
            for row in (m.get("reply_markup") or {}).get("inline_keyboard", []):
                lines.append("    " + " | ".join(f"[{b['text']}]" for b in row))
        return "\n".join(lines)

    # -- the Bot API ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        if request.method == "POST":
            if request.content_type == "application/json":
                params = await request.json()
            else:
                form = await request.post()
                for key, value in form.items():
                    try:
                        params[key] = json.loads(value)
                    except (TypeError, ValueError):
                        params[key] = value
        params.update({k: v for k, v in request.query.items()})
        bot = self.bots.get(token)
        if bot is None:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        with self.lock:
            self.calls.append(Call(token, method, params, time.monotonic()))
            queued = self.errors.get(method)
            error = queued.pop(0) if queued else None
        if error:
            return web.json_response(error, status=error["error_code"])
        handler = getattr(self, f"api_{method}", None)
        if handler is None:
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
        try:
            result = await handler(bot, params)
        except ApiError as exc:
            return web.json_response({"ok": False, "error_code": exc.code, "description": exc.description}, status=exc.code)
        return web.json_response({"ok": True, "result": result})

    def _bot_user(self, bot: BotState) -> dict:
        return {"id": bot.bot_id, "is_bot": True, "first_name": "Shallow", "username": bot.username}

    async def api_getMe(self, bot: BotState, p: dict) -> dict:
        return {**self._bot_user(bot), "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    async def api_deleteWebhook(self, bot: BotState, p: dict) -> bool:
        return True

    async def api_setMyCommands(self, bot: BotState, p: dict) -> bool:
        bot.commands = p.get("commands") or []
        return True

    async def api_getUpdates(self, bot: BotState, p: dict) -> list[dict]:
        offset = int(p.get("offset") or 0)
        deadline = time.monotonic() + float(p.get("timeout") or 0)
        while True:
            with self.lock:
                bot.updates = [u for u in bot.updates if u["update_id"] >= offset]  # confirmed ones are gone
                out = list(bot.updates[: int(p.get("limit") or 100)])
            if out or time.monotonic() >= deadline:
                return out
            await asyncio.sleep(0.05)

    def _text_checks(self, text: Any) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if len(text) > MESSAGE_LIMIT:
            raise ApiError(400, "Bad Request: message is too long")
        return text

    async def api_sendMessage(self, bot: BotState, p: dict) -> dict:
        chat_id = int(p["chat_id"])
        text = self._text_checks(p.get("text"))
        msg = {
            "message_id": next(self._ids), "date": int(time.time()),
            "chat": self._chat(chat_id, self.chat_types.get(chat_id, "private")), "from": self._bot_user(bot), "text": text,
        }
        if p.get("reply_markup"):
            msg["reply_markup"] = p["reply_markup"]
        if p.get("reply_parameters"):
            reply_id = p["reply_parameters"].get("message_id")
            if (chat_id, reply_id) in self.messages:
                msg["reply_to_message"] = {k: v for k, v in self.messages[(chat_id, reply_id)].items() if k != "reply_to_message"}
        with self.lock:
            self.messages[(chat_id, msg["message_id"])] = msg
        return msg

    def _find(self, p: dict) -> dict:
        key = (int(p["chat_id"]), int(p["message_id"]))
        msg = self.messages.get(key)
        if msg is None:
            raise ApiError(400, "Bad Request: message to edit not found")
        return msg

    async def api_editMessageText(self, bot: BotState, p: dict) -> dict:
        text = self._text_checks(p.get("text"))
        with self.lock:
            msg = self._find(p)
            markup = p.get("reply_markup")
            if msg.get("text") == text and msg.get("reply_markup") == markup:
                raise ApiError(400, "Bad Request: message is not modified: specified new message content and reply "
                                    "markup are exactly the same as a current content and reply markup of the message")
            msg["text"] = text
            if markup:
                msg["reply_markup"] = markup
            else:
                msg.pop("reply_markup", None)
            msg["edit_date"] = int(time.time())
            return dict(msg)

    async def api_editMessageReplyMarkup(self, bot: BotState, p: dict) -> dict:
        with self.lock:
            msg = self._find(p)
            if p.get("reply_markup"):
                msg["reply_markup"] = p["reply_markup"]
            else:
                msg.pop("reply_markup", None)
            return dict(msg)

    async def api_answerCallbackQuery(self, bot: BotState, p: dict) -> bool:
        return True

    async def api_sendChatAction(self, bot: BotState, p: dict) -> bool:
        return True


class ApiError(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
