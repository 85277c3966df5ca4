"""`shallow discord`: chat by mention, DM or reply, and /story with buttons, on Discord (discord.py 2).

Every turn: validate, post a placeholder at once, enqueue the job, edit the placeholder as the reply
streams (at most once a second, with a "still writing" mark), then the final text split at 2000
characters into follow-ups, story choices as buttons that survive a restart (dynamic items). A 429 is
waited out by discord.py's own rate limiter. Replies still owed are kept in Redis and delivered after
a restart.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import discord
import yarl
from discord import app_commands

from bots.streaming import (Cooldowns, Deliveries, first_time, ids_from_env, prepare_bot_loop, split_text, status_lines,
                            story_and_turn)
from shared.client import Turn, TurnClient
from shared.errors import BadInput, ConfigError
from shared.protocol import Done, Mode
from shared.settings import Settings

logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # Discord's limit on one message's content
BUTTON_LIMIT = 80  # Discord's limit on a button label

HELP = (
    "Mention me, reply to me, or DM me to chat. Each channel and thread keeps its own conversation.\n"
    "`/story start <title>` starts a choose-your-own-adventure: press a button or mention me with what you do.\n"
    "`/story end` ends it, `/reset` forgets this channel's conversation, `/cancel` stops the reply being written, "
    "`/status` shows the queue."
)


@dataclass(frozen=True)
class DiscordSettings:
    token: str
    api_base_url: str = "https://discord.com/api/v10"  # an API proxy in front of Discord, or a test server
    gateway_url: str = "wss://gateway.discord.gg/"
    allowed_guilds: frozenset[int] = field(default_factory=frozenset)  # empty: every guild
    allowed_channels: frozenset[int] = field(default_factory=frozenset)
    allowed_users: frozenset[int] = field(default_factory=frozenset)
    cooldown: float = 2.0  # seconds between one user's turns
    # this process as one shard of several (Discord's sharding: each shard gets the events of its own guilds, DMs go
    # to shard 0): DISCORD_SHARD_ID of DISCORD_SHARD_COUNT; None: one process for every guild
    shard_id: int | None = None
    shard_count: int | None = None

    @classmethod
    def from_env(cls) -> DiscordSettings:
        token = os.environ.get("DISCORD_BOT_TOKEN", "").strip()
        if not token:
            raise ConfigError("DISCORD_BOT_TOKEN is not set: create an application and bot in the Discord developer portal.")
        try:
            cooldown = float(os.environ.get("DISCORD_COOLDOWN", "2") or 2)
        except ValueError:
            raise ConfigError("DISCORD_COOLDOWN must be a number of seconds") from None
        shard_id, shard_count = _shard_from_env()
        return cls(shard_id=shard_id, shard_count=shard_count,
            token=token,
            api_base_url=os.environ.get("DISCORD_API_BASE_URL", "").strip() or cls.api_base_url,
            gateway_url=os.environ.get("DISCORD_GATEWAY_URL", "").strip() or cls.gateway_url,
            allowed_guilds=ids_from_env("DISCORD_ALLOWED_GUILDS"),
            allowed_channels=ids_from_env("DISCORD_ALLOWED_CHANNELS"),
            allowed_users=ids_from_env("DISCORD_ALLOWED_USERS"),
            cooldown=cooldown,
        )

    def owns(self, guild_id: int | None) -> bool:
        """Whether this process gets the events of this guild (None: a DM, which Discord sends to shard 0)."""
        if not self.shard_count or self.shard_count == 1:
            return True
        if guild_id is None:
            return self.shard_id == 0
        return shard_of(guild_id, self.shard_count) == self.shard_id

    def apply(self) -> None:
        """Point discord.py at these URLs. It has no option for them: these class attributes are what it reads."""
        discord.http.Route.BASE = self.api_base_url.rstrip("/")
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)


def shard_of(guild_id: int, shard_count: int) -> int:
    """The shard that gets a guild's events: Discord's rule, (guild_id >> 22) % shard_count."""
    return (guild_id >> 22) % shard_count


def guild_id_of(channel: object) -> int | None:
    """A channel's guild id: from its guild when discord.py has it, else as the event gave it (a channel not cached
    is a PartialMessageable with `guild_id`); None in a DM."""
    guild = getattr(channel, "guild", None)
    return guild.id if guild is not None else getattr(channel, "guild_id", None)


def _shard_from_env() -> tuple[int | None, int | None]:
    raw_id, raw_count = (os.environ.get(name, "").strip() for name in ("DISCORD_SHARD_ID", "DISCORD_SHARD_COUNT"))
    if not raw_id and not raw_count:
        return None, None
    if not raw_id or not raw_count:
        raise ConfigError("DISCORD_SHARD_ID and DISCORD_SHARD_COUNT go together: this process is shard ID of COUNT "
                          "(0 to COUNT-1), one process a shard")
    try:
        shard_id, shard_count = int(raw_id), int(raw_count)
    except ValueError:
        raise ConfigError(f"DISCORD_SHARD_ID and DISCORD_SHARD_COUNT must be whole numbers, not {raw_id!r} and {raw_count!r}") from None
    if shard_count < 1 or not 0 <= shard_id < shard_count:
        raise ConfigError(f"DISCORD_SHARD_ID must be from 0 to DISCORD_SHARD_COUNT - 1 ({shard_count - 1}), not {shard_id}"
                          if shard_count >= 1 else f"DISCORD_SHARD_COUNT must be 1 or more, not {shard_count}")
    return shard_id, shard_count


class ChoiceButton(discord.ui.DynamicItem[discord.ui.Button], template=r"story:(?P<session>[0-9a-f]+):(?P<turn>\d+):(?P<n>\d)"):
    """A story choice. Its custom id names the story and passage, so it works after a restart and a stale one is told apart."""

    def __init__(self, session: str, turn: int, n: int, label: str = "") -> None:
        self.session, self.turn, self.n = session, turn, n
        label = label or str(n)
        if len(label) > BUTTON_LIMIT:
            label = label[: BUTTON_LIMIT - 1] + "…"
        super().__init__(discord.ui.Button(label=label, style=discord.ButtonStyle.primary, custom_id=f"story:{session}:{turn}:{n}"))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /):
        return cls(match["session"], int(match["turn"]), int(match["n"]), item.label or "")

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: ShallowDiscord = interaction.client  # type: ignore[assignment]
        await bot.on_choice(interaction, self.session, self.turn, self.n)


def choice_view(session_id: str, turn: int, choices: list[str]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for n, choice in enumerate(choices, 1):
        view.add_item(ChoiceButton(session_id, turn, n, f"{n}. {choice}"))
    return view


class DiscordSurface:
    """A reply in a Discord channel: the placeholder message, edited, then follow-up messages."""

    def __init__(self, bot: ShallowDiscord, channel_id: int, message_id: int, view: Callable[[Done], discord.ui.View | None]):
        self.channel = bot.get_partial_messageable(channel_id)
        self.message = self.channel.get_partial_message(message_id)
        self.view = view

    async def show(self, text: str) -> None:
        try:
            await self.message.edit(content=text[:MESSAGE_LIMIT])
        except discord.HTTPException as exc:  # a failed progress edit is replaced by the next one
            logger.warning("progress edit in channel %s failed: %s", self.channel.id, exc)

    async def typing(self) -> None:
        try:
            await self.channel.typing()
        except discord.HTTPException as exc:
            logger.debug("typing in channel %s: %s", self.channel.id, exc)

    async def finish(self, done: Done) -> None:
        text = done.text or "(no reply)"
        if done.finish_reason == "cancelled":
            text += "\n\n(stopped)"
        await self._deliver(split_text(text, MESSAGE_LIMIT), self.view(done))

    async def fail(self, message: str, partial: str) -> None:
        text = (partial.strip() + "\n\n" if partial.strip() else "") + f"⚠️ {message}"
        await self._deliver(split_text(text, MESSAGE_LIMIT), None)

    async def _deliver(self, parts: list[str], view: discord.ui.View | None) -> None:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            kwargs = {"view": view} if last and view is not None else {}
            if i == 0:
                try:
                    await self.message.edit(content=part, **kwargs)
                    continue
                except discord.NotFound:  # the placeholder was deleted: send the text anew
                    logger.warning("placeholder in channel %s is gone; sending a new message", self.channel.id)
            await self.channel.send(part, **kwargs)


class ShallowDiscord(discord.Client):
    def __init__(self, settings: Settings, dc: DiscordSettings, client: TurnClient | None = None) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # slash commands and channel data
        intents.guild_messages = True  # mentions and replies in servers (their content comes without the privileged intent)
        intents.dm_messages = True
        super().__init__(intents=intents, shard_id=dc.shard_id, shard_count=dc.shard_count)
        self.settings = settings
        self.dc = dc
        self.turns = client or TurnClient(settings)
        self.deliveries = Deliveries(self.turns, "discord", self._surface)
        self.r = self.turns.r
        self.cooldowns = Cooldowns(self.r, "shallow:dc:cool:", dc.cooldown)
        self.tree = app_commands.CommandTree(self)
        self._register_commands()

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def channel_key(channel_id: int) -> str:
        return f"discord:{channel_id}"

    def allowed(self, guild_id: int | None, channel_id: int | None, user_id: int | None) -> bool:
        dc = self.dc
        return (
            (not dc.allowed_guilds or guild_id in dc.allowed_guilds or guild_id is None)
            and (not dc.allowed_channels or channel_id in dc.allowed_channels)
            and (not dc.allowed_users or user_id in dc.allowed_users)
        )

    def refuse_once(self, channel_id: int, user_id: int) -> bool:
        """True the first time a day that this user is told they are outside the allowlist here."""
        return first_time(self.r, f"shallow:dc:refused:{channel_id}:{user_id}")

    async def start_turn(self, channel: discord.abc.Messageable, placeholder: discord.Message | None,
                         turn: Turn, reference: discord.Message | None = None) -> None:
        """Placeholder at once, then the job; the reply streams into the placeholder."""
        if placeholder is None:
            placeholder = await channel.send("⏳ …", reference=reference, mention_author=False)
        # the guild says which shard delivers the reply after a restart (Deliveries.resume)
        where = {"channel_id": placeholder.channel.id, "message_id": placeholder.id,
                 "guild_id": guild_id_of(channel) or guild_id_of(placeholder.channel)}
        await self.deliveries.submit(turn, where, lambda text: placeholder.edit(content=text))

    def _surface(self, where: dict) -> DiscordSurface:
        def view(done: Done) -> discord.ui.View | None:
            return choice_view(where["session_id"], where["turn"], done.choices) if done.choices and "session_id" in where else None

        return DiscordSurface(self, where["channel_id"], where["message_id"], view)

    # -- set-up ---------------------------------------------------------------------------------

    async def setup_hook(self) -> None:
        prepare_bot_loop()  # a thread pool with room for a burst of turns, and the interpreter lock handed over every 1 ms
        self.add_dynamic_items(ChoiceButton)  # story buttons keep working after a restart
        if not self.dc.shard_id:  # the commands are the application's: one shard registers them
            await self.tree.sync()
        # the replies owed in this shard's guilds (a record from before sharding has no guild: shard 0's)
        owed = self.deliveries.resume(lambda where: self.dc.owns(where.get("guild_id")))
        if owed:
            logger.info("delivering %d replies owed from before the restart", owed)

    def _register_commands(self) -> None:
        story = app_commands.Group(name="story", description="A choose-your-own-adventure in this channel")

        @story.command(name="start", description="Start a story from its title")
        @app_commands.describe(title="The story's title, e.g. The Lost Crown")
        async def story_start(interaction: discord.Interaction, title: str) -> None:
            """/story start <title>: a new adventure in this channel."""
            if not await self.gate(interaction):
                return
            try:
                self.turns.clean_title(title)
            except BadInput as exc:
                await interaction.response.send_message(str(exc), ephemeral=True)
                return
            channel = self.channel_key(interaction.channel_id)
            response = await interaction.response.send_message("⏳ …")
            placeholder = response.resource if isinstance(response.resource, discord.InteractionMessage) else None
            if placeholder is None:
                placeholder = await interaction.original_response()
            await self.start_turn(interaction.channel, placeholder, Turn("story", channel, title, str(interaction.user.id)))

        @story.command(name="end", description="End the story in this channel")
        async def story_end(interaction: discord.Interaction) -> None:
            """/story end: back to chatting."""
            if not await self.gate(interaction):
                return
            ended = await asyncio.to_thread(self.turns.end_story, self.channel_key(interaction.channel_id))
            await interaction.response.send_message(
                f'The story "{ended.title}" has ended. `/story start` begins a new one.' if ended else "There is no story running here."
            )

        self.tree.add_command(story)

        @self.tree.command(name="reset", description="Forget this channel's conversation and story")
        async def reset(interaction: discord.Interaction) -> None:
            """/reset: forget this channel's conversation."""
            if not await self.gate(interaction):
                return
            had = await asyncio.to_thread(self.turns.reset, self.channel_key(interaction.channel_id))
            await interaction.response.send_message(
                "Done: I've forgotten this channel's conversation and any story." if had else "There was nothing to forget here yet."
            )

        @self.tree.command(name="cancel", description="Stop the reply being written in this channel")
        async def cancel(interaction: discord.Interaction) -> None:
            """/cancel: stop the reply being written."""
            if not await self.gate(interaction):
                return
            job_id = await asyncio.to_thread(self.turns.store.turn_in_flight, self.channel_key(interaction.channel_id))
            if not job_id:
                await interaction.response.send_message("Nothing is being written right now.", ephemeral=True)
                return
            await asyncio.to_thread(self.turns.cancel, job_id)
            await interaction.response.send_message("Stopping the reply.")

        @self.tree.command(name="status", description="The queue and the workers")
        async def status(interaction: discord.Interaction) -> None:
            """/status: this channel's place in the queue and the workers alive."""
            if not await self.gate(interaction):
                return
            lines = await asyncio.to_thread(status_lines, self.turns, self.channel_key(interaction.channel_id))
            await interaction.response.send_message("\n".join(lines), ephemeral=True)

        @self.tree.command(name="help", description="How to use this bot")
        async def help_(interaction: discord.Interaction) -> None:
            """/help: how to use the bot."""
            await interaction.response.send_message(HELP, ephemeral=True)

        @self.tree.error
        async def on_app_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            logger.error("slash command failed: %s", error, exc_info=error)
            message = "Sorry, something went wrong on my side. Please try again."
            if interaction.response.is_done():
                await interaction.followup.send(message, ephemeral=True)
            else:
                await interaction.response.send_message(message, ephemeral=True)

    async def gate(self, interaction: discord.Interaction) -> bool:
        if self.allowed(interaction.guild_id, interaction.channel_id, interaction.user.id):
            return True
        await interaction.response.send_message("Sorry, this bot is not open to you here.", ephemeral=True)
        return False

    # -- events ---------------------------------------------------------------------------------

    async def on_ready(self) -> None:
        logger.info("connected to Discord as %s (id %s)", self.user, self.user.id if self.user else "?")

    def addressed(self, message: discord.Message) -> str | None:
        """The text meant for the bot: DMs, mentions (the mention removed) and replies to the bot; else None."""
        me = self.user
        if me is None or message.author.bot or message.author.id == me.id:
            return None
        text = message.content or ""
        if message.guild is None and getattr(message.channel, "guild_id", None) is None:
            return text
        if me in message.mentions or re.search(rf"<@!?{me.id}>", text):
            return re.sub(rf"<@!?{me.id}>", "", text).strip()
        ref = message.reference.resolved if message.reference else None
        if isinstance(ref, discord.Message) and ref.author.id == me.id:
            return text
        return None

    async def on_message(self, message: discord.Message) -> None:
        text = self.addressed(message)
        if text is None:
            return
        guild_id = message.guild.id if message.guild else getattr(message.channel, "guild_id", None)
        if not self.allowed(guild_id, message.channel.id, message.author.id):
            if await asyncio.to_thread(self.refuse_once, message.channel.id, message.author.id):
                await message.reply("Sorry, this bot is not open to you here.", mention_author=False)
            return
        if not text.strip():
            note = "I can only read text: attachments are not read." if message.attachments else None
            await message.reply(note or "You mentioned me without a message: what would you like to say?", mention_author=False)
            return
        wait = await self.cooldowns.left(message.author.id)  # off the loop every channel shares, with the others' at once
        if wait:
            await message.reply(f"One moment: you can send your next message in {wait:.0f}s.", mention_author=False)
            return
        try:
            self.turns.clean_text(text)
        except BadInput as exc:
            await message.reply(str(exc), mention_author=False)
            return
        channel = self.channel_key(message.channel.id)
        await self.start_turn(message.channel, None, Turn("say", channel, text, str(message.author.id)), reference=message)

    async def on_choice(self, interaction: discord.Interaction, session_id: str, turn: int, n: int) -> None:
        """A story button: acknowledged at once (its buttons removed), then the story goes on."""
        if not self.allowed(interaction.guild_id, interaction.channel_id, interaction.user.id):
            await interaction.response.send_message("Sorry, this bot is not open to you here.", ephemeral=True)
            return
        channel = self.channel_key(interaction.channel_id)
        story, busy = await asyncio.to_thread(story_and_turn, self.turns, channel)
        if story is None or story.id != session_id:
            await interaction.response.edit_message(view=None)
            await interaction.followup.send("This story has ended. `/story start <title>` begins a new one.", ephemeral=True)
            return
        if story.turns != turn or not 1 <= n <= len(story.choices):
            await interaction.response.edit_message(view=None)
            await interaction.followup.send("That choice belongs to an earlier passage.", ephemeral=True)
            return
        if busy:
            await interaction.response.send_message("I'm still writing; press again when the passage is done.", ephemeral=True)
            return
        choice = story.choices[n - 1]
        content = ((interaction.message.content if interaction.message else "") + f"\n\n▶ {n}. {choice}")[-MESSAGE_LIMIT:]
        await interaction.response.edit_message(content=content, view=None)
        await asyncio.to_thread(self.turns.store.set_mode, channel, Mode.STORY)
        await self.start_turn(interaction.channel, None, Turn("say", channel, str(n), str(interaction.user.id)))


def run(settings: Settings) -> int:
    dc = DiscordSettings.from_env()
    dc.apply()
    discord.VoiceClient.warn_nacl = False  # no voice here: the warning about PyNaCl says nothing useful
    bot = ShallowDiscord(settings, dc)
    shard = f", shard {dc.shard_id} of {dc.shard_count}" if dc.shard_count else ""
    logger.info("Discord bot starting (API %s, gateway %s%s)", dc.api_base_url, dc.gateway_url, shard)
    bot.run(dc.token, log_handler=None)  # logging is configured by the command line
    return 0
