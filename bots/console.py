"""The terminal frontend: `shallow chat` and `shallow story "<title>"`, over the same queue as the bots."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

import redis

from shared.client import ReplyText, TurnClient, Waiting
from shared.errors import BadInput, ChannelBusy
from shared.protocol import Chunk, Done, Error, Mode, Start
from shared.redis_conn import DEFAULT_REDIS_URL, redact

logger = logging.getLogger(__name__)

HELP = """Type a message and press Enter. Commands:
  /story <title>   start a choose-your-own-adventure (then type a choice's number or an action)
  /end             end the story and go back to chatting
  /reset           forget this conversation and any story
  /status          the queue and the workers
  /help            this text
  /quit            leave (Ctrl-D works too)"""


class Console:
    def __init__(
        self,
        client: TurnClient,
        channel: str,
        *,
        out: TextIO = sys.stdout,
        worker_problem: Callable[[], str | None] = lambda: None,
        no_worker_note: str = "no worker is running yet: your message waits in the queue until one starts",
    ) -> None:
        self.client = client
        self.channel = channel
        self.out = out
        self.worker_problem = worker_problem  # the demo's check that its worker process still runs
        self.no_worker_note = no_worker_note

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def prompt(self) -> str:
        if self.client.store.mode(self.channel) is Mode.STORY:
            story = self.client.store.get(self.channel, Mode.STORY)
            if story and story.choices:
                return f"choose 1-{len(story.choices)} or type an action> "
            return "what do you do?> "
        return "you> "

    def handle(self, line: str) -> bool:
        """One line of input. Returns False when the user asked to leave."""
        text = line.strip()
        try:
            if text in ("/quit", "/exit"):
                return False
            if text == "/help":
                self.write(HELP + "\n")
            elif text == "/reset":
                had = self.client.reset(self.channel)
                self.write("Forgotten: this conversation starts afresh.\n" if had else "There was nothing to forget here yet.\n")
            elif text == "/status":
                st = self.client.status()
                self.write(
                    f"queue {st['queue']}: {st['queued']} waiting, {st['running']} running, {st['failed']} failed; "
                    f"{len(st['workers'])} worker(s) alive\n"
                )
            elif text == "/end":
                story = self.client.end_story(self.channel)
                self.write(f'The story "{story.title}" has ended. Back to chatting.\n' if story else "There is no story running here.\n")
            elif text == "/story" or text.startswith("/story "):
                submitted = self.client.start_story(self.channel, text[len("/story") :], user="console")
                self.write(f"\n== {submitted.session.title} ==\n")
                self.show_reply(submitted.job_id)
            elif text.startswith("/"):
                self.write(f"Unknown command {text.split()[0]}; /help lists them.\n")
            else:
                submitted = self.client.say(self.channel, text, user="console")
                self.show_reply(submitted.job_id)
        except (BadInput, ChannelBusy) as exc:
            self.write(f"{exc}\n")
        except redis.exceptions.ConnectionError as exc:
            url = redact(self.client.settings.redis_url or DEFAULT_REDIS_URL)
            self.write(f"Lost the connection to Redis at REDIS_URL={url} ({exc}). Try again once it is back.\n")
        return True

    def show_reply(self, job_id: str) -> Done | Error:
        reply = ReplyText()
        shown_wait: tuple | None = None
        try:
            for event in self.client.follow(job_id):
                if isinstance(event, Waiting):
                    problem = self.worker_problem()
                    if problem:
                        self.write(f"({problem})\n")
                        return Error(code="no_worker", message=problem)
                    state = ("none",) if event.workers == 0 else ("queued", event.position)
                    if state != shown_wait:
                        shown_wait = state
                        if event.workers == 0:
                            self.write(f"({self.no_worker_note})\n")
                        elif event.position:
                            self.write(f"(waiting in the queue: position {event.position})\n")
                elif isinstance(event, Start):
                    if reply.attempt:
                        self.write("\n(the worker writing this reply stopped; another attempt starts over)\n")
                    reply.feed(event)
                    self.write("bot> ")
                elif isinstance(event, Chunk):
                    reply.feed(event)
                    if event.attempt == reply.attempt:
                        self.write(event.text)
                elif isinstance(event, Done):
                    self.write("\n")
                    if event.finish_reason == "cancelled":
                        self.write("(stopped)\n")
                    if event.choices:
                        self.write(f"(type 1-{len(event.choices)} to choose, or write your own action)\n")
                    return event
                elif isinstance(event, Error):
                    self.write(f"\n{event.message}\n")
                    return event
        except KeyboardInterrupt:
            self.client.cancel(job_id)
            self.write("\n(cancelled)\n")
        return Error(code="cancelled", message="cancelled")

    def run(self, read: Callable[[str], str] = input) -> int:
        interactive = sys.stdin.isatty()
        if interactive:
            self.write("Type /help for commands.\n")
        while True:
            try:
                line = read(self.prompt() if interactive else "")
            except EOFError:
                if interactive:
                    self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                return 0
            if not self.handle(line):
                return 0
