"""`shallow web`: the lab's Chatbot and Storymaker pages as two tabs of one Gradio app, over the same queue.

Each browser keeps a random session id in its local storage, so a page reload finds its conversation
and story again (from the session store) and two browsers never share one. The session id names two
channels, one per tab, so a story passage being written does not block the chat and vice versa.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import redis

from bots.streaming import WRITING_MARK, waiting_text
from shared.client import ReplyText, TurnClient, Waiting
from shared.errors import BadInput, ChannelBusy, ConfigError
from shared.prompts import parse_choices
from shared.protocol import Chunk, Done, Error, Mode, Start
from shared.settings import Settings

logger = logging.getLogger(__name__)

MAX_CHOICE_BUTTONS = 4  # parse_choices and the worker's forced choices give 2-4
UPDATE_INTERVAL = 0.1  # seconds between screen updates of a streaming reply
_SID = re.compile(r"^[0-9a-f]{32}$")

Message = dict[str, str]
SESSION_KEY = "shallow-session"
READ_SESSION = f"() => localStorage.getItem('{SESSION_KEY}') || ''"
SAVE_SESSION = f"(sid) => {{ if (sid) localStorage.setItem('{SESSION_KEY}', sid); }}"


@dataclass(frozen=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    user: str = "shallow"
    password: str | None = None
    max_threads: int = 100  # replies streamed at once (each holds a thread while it follows its stream)

    @classmethod
    def from_env(cls) -> WebSettings:
        raw_port = os.environ.get("SHALLOW_WEB_PORT", str(cls.port))
        try:
            port = int(raw_port)
        except ValueError:
            raise ConfigError(f"SHALLOW_WEB_PORT must be a port number, got {raw_port!r}") from None
        if not 0 < port < 65536:
            raise ConfigError(f"SHALLOW_WEB_PORT must be between 1 and 65535, got {port}")
        return cls(
            host=os.environ.get("SHALLOW_WEB_HOST") or cls.host,
            port=port,
            user=os.environ.get("SHALLOW_WEB_USER") or cls.user,
            password=os.environ.get("SHALLOW_WEB_PASSWORD") or None,
        )


def passage_of(text: str) -> str:
    """A story passage without its numbered menu (the menu is shown as buttons)."""
    passage, choices = parse_choices(text)
    return passage if choices else text


class WebApp:
    def __init__(self, settings: Settings, client: TurnClient | None = None) -> None:
        self.settings = settings
        self.client = client or TurnClient(settings)
        self.store = self.client.store

    # -- channels -----------------------------------------------------------------------------

    @staticmethod
    def chat_channel(sid: str) -> str:
        return f"web:{sid}:chat"

    @staticmethod
    def story_channel(sid: str) -> str:
        return f"web:{sid}:story"

    # -- following a reply ------------------------------------------------------------------------

    def follow(self, job_id: str) -> Iterator[tuple[str, str, Done | Error | None]]:
        """(text to show, notice, the end event or None) as the reply arrives; throttled for the browser."""
        reply = ReplyText()
        notice = ""
        last = 0.0
        for event in self.client.follow(job_id, poll=0.5):
            if isinstance(event, Waiting):
                yield waiting_text(event), notice, None
                continue
            if isinstance(event, Done):
                text = event.text
                if event.finish_reason == "cancelled":
                    text = (text.rstrip() + "\n\n*(stopped)*").strip()
                yield text, "", event
                return
            if isinstance(event, Error):
                partial = reply.text.strip()
                yield (partial + "\n\n" if partial else "") + f"⚠️ {event.message}", "", event
                return
            if isinstance(event, Start) and reply.attempt:
                notice = "The worker writing this reply stopped; another one starts it over."
            reply.feed(event)
            now = time.monotonic()
            if isinstance(event, Chunk) and now - last >= UPDATE_INTERVAL:
                last = now
                yield reply.text.strip() + WRITING_MARK, notice, None
            elif isinstance(event, Start):
                yield "✍️ Writing…", notice, None

    def _refusal(self, exc: Exception) -> str:
        if isinstance(exc, (BadInput, ChannelBusy)):
            return f"⚠️ {exc}"
        logger.warning("redis unavailable: %s", exc)
        return "⚠️ The queue (Redis) cannot be reached right now; please try again in a moment."

    # -- session ------------------------------------------------------------------------------

    def open_session(self, stored: str | None) -> tuple[Any, ...]:
        """On page load: this browser's session id (a new one the first time), its chat and its story."""
        sid = stored if isinstance(stored, str) and _SID.match(stored) else uuid.uuid4().hex
        ready = [gr.update(interactive=True)] * len(self.inputs)  # the inputs wait for the session id
        try:
            chat = self.store.history(self.chat_channel(sid), Mode.CHAT)
            story, choices, title = self.story_history(sid)
        except redis.exceptions.ConnectionError as exc:
            notice = self._refusal(exc)
            return (sid, [], notice, [], "", *self.buttons([]), notice, *ready)
        heading = f"### {title}" if title else ""
        return (sid, chat, "", story, heading, *self.buttons(choices), "", *ready)

    @staticmethod
    def check_sid(sid: str) -> None:
        if not (isinstance(sid, str) and _SID.match(sid)):
            raise BadInput("The page is still opening; send that again in a moment.")

    def story_history(self, sid: str) -> tuple[list[Message], list[str], str | None]:
        channel = self.story_channel(sid)
        session = self.store.get(channel, Mode.STORY)
        if session is None:
            return [], [], None
        shown: list[Message] = []
        menu: list[str] = []
        for turn in self.store.history(channel, Mode.STORY):
            if turn["role"] == "assistant":
                _, menu = parse_choices(turn["content"])
                shown.append({"role": "assistant", "content": passage_of(turn["content"])})
            else:
                shown.append({"role": "user", "content": self.action_label(turn["content"], menu)})
        return shown, session.choices, session.title

    @staticmethod
    def action_label(user_text: str, menu: list[str]) -> str:
        if user_text.startswith("/story "):
            return f"📖 A new story: **{user_text[len('/story '):]}**"
        n = user_text.strip().rstrip(".")
        if n.isdigit() and 1 <= int(n) <= len(menu):
            return f"▶ {menu[int(n) - 1]}"
        return f"▶ {user_text}"

    @staticmethod
    def buttons(choices: list[str], interactive: bool = True) -> list[Any]:
        out = []
        for i in range(MAX_CHOICE_BUTTONS):
            if i < len(choices):
                out.append(gr.Button(value=f"{i + 1}. {choices[i]}", visible=True, interactive=interactive))
            else:
                out.append(gr.Button(value="", visible=False))
        return out

    # -- chat tab -------------------------------------------------------------------------------

    def send_chat(self, text: str, sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
        """Outputs: chatbot, message box, notice."""
        history = list(history or [])
        try:
            self.check_sid(sid)
            submitted = self.client.chat(self.chat_channel(sid), text, user="web")
        except (BadInput, ChannelBusy, redis.exceptions.ConnectionError) as exc:
            yield history, gr.skip(), self._refusal(exc)
            return
        history += [{"role": "user", "content": submitted.request.user_text}, {"role": "assistant", "content": "⏳"}]
        yield history, "", ""
        yield from self._stream_chat(submitted.job_id, history)

    def resume_chat(self, sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
        """After a reload: follow a reply that was still being written (it lands in the history at its end)."""
        job_id = self.store.turn_in_flight(self.chat_channel(sid)) if sid else None
        if not job_id:
            yield gr.skip(), gr.skip(), gr.skip()  # (a generator that yields nothing would blank the outputs)
            return
        history = list(history or []) + [{"role": "assistant", "content": "⏳"}]
        yield history, gr.skip(), "Your last message is still being answered."
        yield from self._stream_chat(job_id, history, refresh_sid=sid)

    def _stream_chat(self, job_id: str, history: list[Message], refresh_sid: str | None = None) -> Iterator[tuple[Any, ...]]:
        for text, notice, end in self.follow(job_id):
            history[-1] = {"role": "assistant", "content": text}
            if end is not None and refresh_sid and isinstance(end, Done):
                history = self.store.history(self.chat_channel(refresh_sid), Mode.CHAT) or history
            yield history, gr.skip(), notice

    def stop(self, channel: str) -> str:
        job_id = self.store.turn_in_flight(channel)
        if not job_id:
            return "Nothing is being written right now."
        self.client.cancel(job_id)
        return "Stopping…"

    def reset_chat(self, sid: str) -> tuple[Any, ...]:
        try:
            self.check_sid(sid)
            had = self.client.reset(self.chat_channel(sid))
        except (BadInput, redis.exceptions.ConnectionError) as exc:
            return gr.skip(), self._refusal(exc)
        return [], ("Forgotten: this conversation starts afresh." if had else "")

    # -- story tab ------------------------------------------------------------------------------
    # Outputs of each story handler: story chatbot, heading, the choice buttons, action box, title box, notice.

    def _story_out(self, history, heading=None, buttons=None, action=None, title=None, notice=""):
        """None: leave that part of the page as it is."""
        skip = gr.skip()
        buttons = buttons if buttons is not None else [skip] * MAX_CHOICE_BUTTONS
        return (history, skip if heading is None else heading, *buttons, skip if action is None else action,
                skip if title is None else title, notice)

    def start_story(self, title: str, sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
        history = list(history or [])
        try:
            self.check_sid(sid)
            submitted = self.client.start_story(self.story_channel(sid), title, user="web")
        except (BadInput, ChannelBusy, redis.exceptions.ConnectionError) as exc:
            yield self._story_out(history, notice=self._refusal(exc))
            return
        story_title = submitted.session.title or ""
        history = [{"role": "user", "content": self.action_label(submitted.request.user_text, [])}, {"role": "assistant", "content": "⏳"}]
        yield self._story_out(history, f"### {story_title}", self.buttons([]), "", "")
        yield from self._stream_story(submitted.job_id, history)

    def choose(self, index: int, sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
        yield from self._act(str(index + 1), sid, history)

    def _chooser(self, index: int):
        def choose(sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
            yield from self.choose(index, sid, history)

        return choose

    def act(self, text: str, sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
        yield from self._act(text, sid, history, clear_box=True)

    def _act(self, text: str, sid: str, history: list[Message], clear_box: bool = False) -> Iterator[tuple[Any, ...]]:
        history = list(history or [])
        channel = self.story_channel(sid)
        try:
            self.check_sid(sid)
            story = self.store.get(channel, Mode.STORY)
            if story is None:
                raise BadInput("There is no story running: give it a title above and press “Start the story”.")
            menu = story.choices
            self.store.set_mode(channel, Mode.STORY)
            submitted = self.client.say(channel, text, user="web")
        except (BadInput, ChannelBusy, redis.exceptions.ConnectionError) as exc:
            yield self._story_out(history, notice=self._refusal(exc))
            return
        history += [{"role": "user", "content": self.action_label(submitted.request.user_text, menu)}, {"role": "assistant", "content": "⏳"}]
        yield self._story_out(history, buttons=self.buttons(menu, interactive=False), action="" if clear_box else None)
        yield from self._stream_story(submitted.job_id, history)

    def end_story(self, sid: str) -> tuple[Any, ...]:
        try:
            self.check_sid(sid)
            channel = self.story_channel(sid)
            job_id = self.store.turn_in_flight(channel)
            if job_id:
                self.client.cancel(job_id)
            ended = self.client.end_story(channel)
        except (BadInput, redis.exceptions.ConnectionError) as exc:
            return self._story_out(gr.skip(), notice=self._refusal(exc))
        note = f"The story “{ended.title}” has ended; give a new title to start another." if ended else ""
        return self._story_out([], "", self.buttons([]), notice=note)

    def resume_story(self, sid: str, history: list[Message]) -> Iterator[tuple[Any, ...]]:
        job_id = self.store.turn_in_flight(self.story_channel(sid)) if sid else None
        if not job_id:
            yield (gr.skip(),) * (5 + MAX_CHOICE_BUTTONS)
            return
        history = list(history or []) + [{"role": "assistant", "content": "⏳"}]
        yield self._story_out(history, notice="The last passage is still being written.")
        yield from self._stream_story(job_id, history, refresh_sid=sid)

    def _stream_story(self, job_id: str, history: list[Message], refresh_sid: str | None = None) -> Iterator[tuple[Any, ...]]:
        for text, notice, end in self.follow(job_id):
            if isinstance(end, Done):
                if refresh_sid:
                    history, _, _ = self.story_history(refresh_sid)
                else:
                    history[-1] = {"role": "assistant", "content": passage_of(text) if end.choices else text}
                note = "" if end.choices else "The story goes on: write what you do next."
                yield self._story_out(history, buttons=self.buttons(end.choices or []), notice=note)
            else:
                history[-1] = {"role": "assistant", "content": text}
                yield self._story_out(history, notice=notice)

    # -- the page -------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="shallow", analytics_enabled=False) as page:
            # this browser's session id: read from and saved to its local storage by the page itself
            sid = gr.Textbox("", visible="hidden", elem_id="session-id")
            gr.Markdown("## shallow\nTalk to this community's own fine-tuned model, or play a choose-your-own-adventure.")
            with gr.Tabs():
                with gr.Tab("Chat", id="chat", render_children=True):
                    chat = gr.Chatbot(label="Chat", height=460, elem_id="chat-log", buttons=["copy"], feedback_options=None)
                    with gr.Row():
                        message = gr.Textbox(
                            placeholder="Message the model and press Enter", show_label=False, scale=8, lines=1,
                            max_lines=6, elem_id="chat-input", autofocus=True, interactive=False,
                        )
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send", interactive=False)
                    with gr.Row():
                        stop_chat = gr.Button("Stop", size="sm", elem_id="chat-stop")
                        reset = gr.Button("New conversation", size="sm", elem_id="chat-reset")
                    chat_notice = gr.Markdown("", elem_id="chat-notice")
                with gr.Tab("Story", id="story", render_children=True):
                    with gr.Row():
                        title = gr.Textbox(
                            placeholder="A title, e.g. The Lost Crown", show_label=False, scale=8, elem_id="story-title", interactive=False,
                        )
                        start = gr.Button("Start the story", variant="primary", scale=1, elem_id="story-start", interactive=False)
                    heading = gr.Markdown("", elem_id="story-heading")
                    story = gr.Chatbot(label="Story", height=420, elem_id="story-log", buttons=["copy"], feedback_options=None)
                    choice_buttons = [
                        gr.Button("", visible=False, elem_id=f"story-choice-{i + 1}", elem_classes=["story-choice"])
                        for i in range(MAX_CHOICE_BUTTONS)
                    ]
                    with gr.Row():
                        action = gr.Textbox(
                            placeholder="Or write what you do, and press Enter", show_label=False, scale=8,
                            elem_id="story-action", interactive=False,
                        )
                        act = gr.Button("Do it", scale=1, elem_id="story-act", interactive=False)
                    stop_story = gr.Button("Stop", size="sm", elem_id="story-stop")
                    story_notice = gr.Markdown("", elem_id="story-notice")

            story_outputs = [story, heading, *choice_buttons, action, title, story_notice]
            self.inputs = [message, send, title, start, action, act]
            opened = page.load(
                self.open_session, [sid], [sid, chat, chat_notice, story, heading, *choice_buttons, story_notice, *self.inputs],
                js=READ_SESSION, api_visibility="private",
            )
            opened.then(None, [sid], None, js=SAVE_SESSION)
            opened.then(self.resume_chat, [sid, chat], [chat, message, chat_notice], api_visibility="private")
            opened.then(self.resume_story, [sid, story], story_outputs, api_visibility="private")

            for trigger in (message.submit, send.click):
                trigger(self.send_chat, [message, sid, chat], [chat, message, chat_notice], api_visibility="private")
            stop_chat.click(lambda s: self.stop(self.chat_channel(s)), [sid], [chat_notice], api_visibility="private")
            reset.click(self.reset_chat, [sid], [chat, chat_notice], api_visibility="private")
            chat.clear(self.reset_chat, [sid], [chat, chat_notice], api_visibility="private")  # its bin icon

            for trigger in (title.submit, start.click):
                trigger(self.start_story, [title, sid, story], story_outputs, api_visibility="private")
            for i, button in enumerate(choice_buttons):
                button.click(self._chooser(i), [sid, story], story_outputs, api_visibility="private")
            for trigger in (action.submit, act.click):
                trigger(self.act, [action, sid, story], story_outputs, api_visibility="private")
            story.clear(self.end_story, [sid], story_outputs, api_visibility="private")  # its bin icon
            stop_story.click(lambda s: self.stop(self.story_channel(s)), [sid], [story_notice], api_visibility="private")
        page.queue(default_concurrency_limit=None)
        return page


THEME_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"]  # no web fonts: works offline
THEME_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]


def run(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    web = WebSettings.from_env()
    app = WebApp(settings)
    page = app.build()
    auth = (web.user, web.password) if web.password else None
    host, port = host or web.host, port or web.port
    logger.info("shallow web on http://%s:%d%s", host, port, " (password required)" if auth else "")
    page.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        auth_message="This shallow page needs a password." if auth else None,
        max_threads=web.max_threads,
        ssr_mode=False,
        footer_links=[],
        theme=gr.themes.Soft(font=THEME_FONTS, font_mono=THEME_MONO),
        quiet=True,
    )
    return 0
