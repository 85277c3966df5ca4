"""A small fake of Discord on 127.0.0.1: the REST routes the bot uses and a gateway WebSocket.

The real discord.py client connects to it through DISCORD_API_BASE_URL and DISCORD_GATEWAY_URL. It
speaks the real wire format (JSON payloads, snowflake ids as strings, the gateway's HELLO / IDENTIFY /
READY / heartbeat / dispatch frames, interaction callbacks with `with_response`, 429 bodies with
`retry_after`), keeps every channel's messages and records every REST call.
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMsgType, web

from tests.bots.fake_server import ThreadedServer

MESSAGE_LIMIT = 2000
EPHEMERAL = 64


@dataclass
class Call:
    method: str
    path: str
    body: Any
    at: float



def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class FakeDiscord(ThreadedServer):
    name = "FakeDiscord"
    def __init__(self, bot_id: int = 900, app_id: int = 901, guild_id: int = 500) -> None:
        super().__init__()
        self.bot_id, self.app_id, self.guild_id = bot_id, app_id, guild_id
        self.bot_user = {"id": str(bot_id), "username": "shallow", "discriminator": "0", "global_name": "Shallow",
                         "avatar": None, "bot": True}
        self.calls: list[Call] = []
        self.messages: dict[int, dict] = {}  # message id -> message
        self.commands: list[dict] = []
        self.interactions: dict[str, dict] = {}  # token -> interaction
        self.responses: dict[str, list[dict]] = {}  # interaction id -> callback bodies
        self.rate_limits: dict[str, list[float]] = {}  # "METHOD /path/prefix" -> retry_after values to answer with
        self.identified = 0
        self.slash_log: list[tuple[int, str, str]] = []  # (order, channel id, "user1> /story start title: ...")
        self.lock = threading.Lock()
        self._ids = itertools.count(10_000)
        self._seq = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self.shards: dict[int, tuple[int, int]] = {}  # id(socket) -> (shard id, shard count) it identified as
        self.identified_shards: list[tuple[int, int]] = []
        self.sent: list[tuple[int, int, str, str | None]] = []  # (shard id, count, event, channel id) of each event sent

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def api_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)

    def _new_id(self) -> str:
        return str(next(self._ids))

    # -- the gateway ----------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            op = data.get("op")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
            elif op == 2:
                shard = tuple(data["d"].get("shard") or (0, 1))  # [id, count]: this connection gets that shard's events
                with self.lock:
                    self.identified += 1
                    self.shards[id(ws)] = shard
                    self.identified_shards.append(shard)
                self._sockets.append(ws)
                await self._send(ws, "READY", {
                    "v": 10, "user": self.bot_user, "guilds": [], "private_channels": [], "relationships": [],
                    "session_id": f"session-{self.identified}", "resume_gateway_url": self.gateway_url, "shard": list(shard),
                    "application": {"id": str(self.app_id), "flags": 0},
                })
        if ws in self._sockets:
            self._sockets.remove(ws)
        with self.lock:
            self.shards.pop(id(ws), None)  # an id a later socket may get
        return ws

    async def _send(self, ws: web.WebSocketResponse, event: str, data: dict) -> None:
        await ws.send_str(json.dumps({"op": 0, "s": next(self._seq), "t": event, "d": data}))

    def dispatch(self, event: str, data: dict) -> None:
        """Send a gateway event to every connected bot of its shard (from the test's thread), as Discord does: a
        guild's events to shard (guild_id >> 22) % count, the rest (DMs) to shard 0."""
        guild = data.get("guild_id")

        async def send_all() -> None:
            for ws in list(self._sockets):
                shard_id, count = self.shards.get(id(ws), (0, 1))
                if (int(guild) >> 22) % count == shard_id if guild else shard_id == 0:
                    with self.lock:
                        self.sent.append((shard_id, count, event, data.get("channel_id")))
                    await self._send(ws, event, data)

        self.run_in_loop(send_all())

    def connected(self) -> int:
        return len(self._sockets)

    # -- what users do --------------------------------------------------------------------------------

    def user(self, user_id: int) -> dict:
        return {"id": str(user_id), "username": f"user{user_id}", "discriminator": "0", "global_name": f"User {user_id}",
                "avatar": None}

    def _member(self, user_id: int) -> dict:
        return {"user": self.user(user_id), "roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0,
                "permissions": "2147483647"}

    def post(self, channel_id: int, content: str, *, user_id: int = 1, dm: bool = False, mention: bool = False,
             reply_to: int | None = None, attachments: list[dict] | None = None, author_is_bot: bool = False,
             guild_id: int | None = None) -> dict:
        """A user's message in a channel (a guild channel unless `dm`; of `guild_id`, default the fake's guild)."""
        if mention:
            content = f"<@{self.bot_id}> {content}".rstrip()
        msg: dict[str, Any] = {
            "id": self._new_id(), "channel_id": str(channel_id), "author": dict(self.user(user_id), bot=author_is_bot),
            "content": content,
            "timestamp": _now(), "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": [self.bot_user] if mention else [], "mention_roles": [], "attachments": attachments or [],
            "embeds": [], "pinned": False, "type": 0 if reply_to is None else 19, "flags": 0, "components": [],
        }
        if not dm:
            msg["guild_id"] = str(guild_id or self.guild_id)
            msg["member"] = {k: v for k, v in self._member(user_id).items() if k != "user"}
        if reply_to is not None:
            ref = self.messages[reply_to]
            msg["message_reference"] = {"message_id": ref["id"], "channel_id": ref["channel_id"], **(
                {"guild_id": str(guild_id or self.guild_id)} if not dm else {})}
            msg["referenced_message"] = ref
        with self.lock:
            self.messages[int(msg["id"])] = msg
        self.dispatch("MESSAGE_CREATE", msg)
        return msg

    def _interaction(self, kind: int, channel_id: int, user_id: int, data: dict, dm: bool, message: dict | None = None) -> dict:
        token = f"itoken-{self._new_id()}"
        interaction: dict[str, Any] = {
            "id": self._new_id(), "application_id": str(self.app_id), "type": kind, "token": token, "version": 1,
            "channel_id": str(channel_id), "data": data, "locale": "en-US", "app_permissions": "2147483647",
            "entitlements": [], "authorizing_integration_owners": {"0": str(self.guild_id)} if not dm else {"1": str(user_id)},
            "context": 1 if dm else 0, "attachment_size_limit": 10485760,
            "channel": {"id": str(channel_id), "type": 1 if dm else 0, **({} if dm else {"guild_id": str(self.guild_id),
                        "name": "general", "position": 0, "permission_overwrites": [], "nsfw": False})},
        }
        if dm:
            interaction["user"] = self.user(user_id)
        else:
            interaction["guild_id"] = str(self.guild_id)
            interaction["guild_locale"] = "en-US"
            interaction["member"] = self._member(user_id)
        if message is not None:
            interaction["message"] = message
        with self.lock:
            self.interactions[token] = interaction
        self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    def slash(self, channel_id: int, name: str, *, sub: str | None = None, options: dict | None = None,
              user_id: int = 1, dm: bool = False) -> dict:
        """A user runs a slash command (`/story start title:...`)."""
        cmd = next((c for c in self.commands if c["name"] == name), None)
        if cmd is None:
            raise AssertionError(f"/{name} was not registered; registered: {[c['name'] for c in self.commands]}")
        shown = " ".join(x for x in (f"/{name}", sub, *(f"{k}: {v}" for k, v in (options or {}).items())) if x)
        with self.lock:
            self.slash_log.append((next(self._ids), str(channel_id), f"user{user_id}> {shown}"))
        opts = [{"type": 3, "name": k, "value": v} for k, v in (options or {}).items()]
        if sub:
            opts = [{"type": 1, "name": sub, "options": opts}]
        return self._interaction(2, channel_id, user_id, {"id": cmd["id"], "name": name, "type": 1, "options": opts}, dm)

    def press(self, message_id: int, custom_id: str, *, user_id: int = 1, dm: bool = False) -> dict:
        """A user presses a button under one of the bot's messages."""
        with self.lock:
            message = json.loads(json.dumps(self.messages[message_id]))
        return self._interaction(3, int(message["channel_id"]), user_id, {"custom_id": custom_id, "component_type": 2}, dm,
                                 message=message)

    def rate_limit(self, method: str, path_prefix: str, retry_after: float, times: int = 1) -> None:
        """The next `times` calls of METHOD to a path starting with `path_prefix` get a 429."""
        with self.lock:
            self.rate_limits.setdefault(f"{method} {path_prefix}", []).extend([retry_after] * times)

    # -- reading the result -------------------------------------------------------------------------

    def channel_messages(self, channel_id: int, *, bot_only: bool = False, public: bool = True) -> list[dict]:
        with self.lock:
            out = [m for _, m in sorted(self.messages.items()) if m["channel_id"] == str(channel_id)]
        if bot_only:
            out = [m for m in out if m["author"]["id"] == str(self.bot_id)]
        if public:
            out = [m for m in out if not m.get("flags", 0) & EPHEMERAL]
        return out

    def ephemeral(self, channel_id: int) -> list[dict]:
        with self.lock:
            return [m for _, m in sorted(self.messages.items())
                    if m["channel_id"] == str(channel_id) and m.get("flags", 0) & EPHEMERAL]

    def calls_to(self, method: str, path_part: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == method and path_part in c.path]

    def transcript(self, channel_id: int) -> str:
        """The channel as its members saw it: messages in order (final text), buttons, and slash commands used."""
        entries: list[tuple[int, list[str]]] = []
        for m in self.channel_messages(channel_id, public=False):
            who = "bot" if m["author"]["id"] == str(self.bot_id) else m["author"]["username"]
            flag = " (only you can see this)" if m.get("flags", 0) & EPHEMERAL else ""
            lines = [f"{who}{flag}> {m['content']}"]
            for row in m.get("components", []):
                lines.append("    " + " | ".join(f"[{c.get('label')}]" for c in row.get("components", [])))
            entries.append((int(m["id"]), lines))
        with self.lock:
            entries += [(order, [text]) for order, ch, text in self.slash_log if ch == str(channel_id)]
        return "\n".join(line for _, lines in sorted(entries) for line in lines)

    # -- REST -----------------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body: Any = None
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
            elif request.content_type.startswith("multipart/"):
                form = await request.post()
                body = json.loads(form.get("payload_json", "{}"))
        with self.lock:
            self.calls.append(Call(request.method, path, body, time.monotonic()))
            limited = None
            for key, queue in self.rate_limits.items():
                method, prefix = key.split(" ", 1)
                if method == request.method and path.startswith(prefix) and queue:
                    limited = queue.pop(0)
                    break
        if limited is not None:
            return _json({"message": "You are being rate limited.", "retry_after": limited, "global": False},
                         status=429, headers={"Via": "1.1 google", "X-RateLimit-Scope": "user"})
        try:
            result = self._route(request.method, path, body)
        except ApiError as exc:
            return _json({"message": exc.message, "code": exc.code}, status=exc.status)
        if result is None:
            return web.Response(status=204)
        return _json(result)

    def _route(self, method: str, path: str, body: Any) -> Any:
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/users/@me":
            return self.bot_user
        if method == "GET" and path == "/oauth2/applications/@me":
            return {"id": str(self.app_id), "name": "Shallow", "description": "", "icon": None, "bot_public": True,
                    "bot_require_code_grant": False, "owner": self.user(1), "team": None, "verify_key": "0" * 64,
                    "flags": 0, "summary": "", "rpc_origins": []}
        if method == "GET" and path in ("/gateway", "/gateway/bot"):
            return {"url": self.gateway_url, "shards": 1,
                    "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            with self.lock:
                self.commands = [dict(c, id=self._new_id(), application_id=str(self.app_id), version="1") for c in body]
                return self.commands
        if parts[0] == "channels" and len(parts) >= 3:
            channel_id = parts[1]
            if method == "POST" and parts[2] == "typing":
                return None
            if method == "POST" and parts[2] == "messages" and len(parts) == 3:
                return self._create(channel_id, body)
            if method == "PATCH" and parts[2] == "messages" and len(parts) == 4:
                return self._edit(int(parts[3]), body)
        if parts[0] == "interactions" and parts[-1] == "callback":
            return self._callback(parts[1], parts[2], body)
        if parts[0] == "webhooks" and len(parts) >= 3:
            interaction = self.interactions.get(parts[2])
            if interaction is None:
                raise ApiError(404, 10015, "Unknown Webhook")
            if len(parts) == 3 and method == "POST":  # a follow-up message
                return self._create(interaction["channel_id"], body)
            if parts[-1] == "@original":
                mid = interaction.get("_response_message")
                if mid is None:
                    raise ApiError(404, 10008, "Unknown Message")
                return self._edit(mid, body) if method == "PATCH" else self.messages[mid]
        raise ApiError(404, 0, f"404: Not Found ({method} {path})")

    def _components(self, body: dict) -> list:
        return body.get("components") or []

    def _create(self, channel_id: str, body: dict, flags: int | None = None) -> dict:
        content = body.get("content") or ""
        if len(content) > MESSAGE_LIMIT:
            raise ApiError(400, 50035, "Invalid Form Body: content: Must be 2000 or fewer in length.")
        if not content and not body.get("components"):
            raise ApiError(400, 50006, "Cannot send an empty message")
        msg = {
            "id": self._new_id(), "channel_id": str(channel_id), "author": self.bot_user, "content": content,
            "timestamp": _now(), "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0,
            "flags": flags if flags is not None else (body.get("flags") or 0), "components": self._components(body),
        }
        ref = body.get("message_reference")
        if ref and int(ref["message_id"]) in self.messages:
            msg["type"] = 19
            msg["message_reference"] = ref
            msg["referenced_message"] = self.messages[int(ref["message_id"])]
        with self.lock:
            self.messages[int(msg["id"])] = msg
        return msg

    def _edit(self, message_id: int, body: dict) -> dict:
        with self.lock:
            msg = self.messages.get(message_id)
            if msg is None:
                raise ApiError(404, 10008, "Unknown Message")
            if "content" in body:
                content = body["content"] or ""
                if len(content) > MESSAGE_LIMIT:
                    raise ApiError(400, 50035, "Invalid Form Body: content: Must be 2000 or fewer in length.")
                msg["content"] = content
            if "components" in body:
                msg["components"] = body["components"] or []
            msg["edited_timestamp"] = _now()
            return dict(msg)

    def _callback(self, interaction_id: str, token: str, body: dict) -> dict:
        interaction = self.interactions.get(token)
        if interaction is None or interaction["id"] != interaction_id:
            raise ApiError(404, 10062, "Unknown interaction")
        with self.lock:
            if interaction.get("_answered"):
                raise ApiError(400, 40060, "Interaction has already been acknowledged.")
            interaction["_answered"] = True
            self.responses.setdefault(interaction_id, []).append(body)
        kind = body["type"]
        data = body.get("data") or {}
        message = None
        if kind == 4:  # a message in the channel
            message = self._create(interaction["channel_id"], data, flags=data.get("flags") or 0)
            interaction["_response_message"] = int(message["id"])
        elif kind == 7:  # update the message the button is on
            message = self._edit(int(interaction["message"]["id"]), data)
            interaction["_response_message"] = int(message["id"])
        result: dict[str, Any] = {"interaction": {
            "id": interaction_id, "type": interaction["type"], "response_message_id": message["id"] if message else None,
            "response_message_loading": kind == 5, "response_message_ephemeral": bool((data.get("flags") or 0) & EPHEMERAL),
        }}
        if message is not None:
            result["resource"] = {"type": kind, "message": message}
        return result


def _json(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    """Discord answers with exactly `application/json` (discord.py compares the header as a whole)."""
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
