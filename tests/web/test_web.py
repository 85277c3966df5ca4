"""The web frontend end to end: `shallow web` (Gradio) in its own process, driven by a real headless
Chromium through Playwright, with a real redis-server, a real worker process and SmolLM2.

Screenshots of both tabs go to SHALLOW_SCREENSHOT_DIR when it is set (docs/screenshots/ holds a run's).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from bots.web import WRITING_MARK
from shared.client import TurnClient
from shared.protocol import Mode
from tests.conftest import Env, Processes, RedisProc, launch_worker, wait_for

pytestmark = pytest.mark.slow

# Debian's Chromium, as root, on a machine without outside network: the flags keep it from trying.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
MAX_INPUT = 300
BUSY = ("⏳", "✍️")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    env: Env
    procs: Processes
    client: TurnClient
    url: str
    worker: object = None
    worker_n: int = 0

    def start_worker(self):
        self.worker_n += 1
        self.worker = launch_worker(self.procs, self.env.vars(), f"web-worker{self.worker_n}-{os.getpid()}", self.client.r)
        return self.worker

    def web_channels(self, tab: str) -> list[str]:
        return sorted(k.decode().split(":")[3] for k in self.client.r.keys(f"shallow:s:web:*:{tab}:{tab}:turns"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("web")
    redis = RedisProc(tmp / "redis")
    procs = Processes(tmp)
    redis.start()
    try:
        port = free_port()
        env = Env(redis=redis, model=model_dir, home=tmp / "home", extra={
            "SHALLOW_MAX_NEW_TOKENS": "40", "SHALLOW_MAX_INPUT_CHARS": str(MAX_INPUT), "GRADIO_ANALYTICS_ENABLED": "False",
        })
        s = Stack(env=env, procs=procs, client=TurnClient(env.settings()), url=f"http://127.0.0.1:{port}/")
        s.start_worker()
        web = procs.start(["web", "--port", str(port)], env.vars(), "web")

        def serving():
            if web.poll() is not None:
                raise AssertionError(f"shallow web exited: {web.log_path.read_text()[-3000:]}")
            try:
                return urllib.request.urlopen(s.url, timeout=2).status == 200
            except OSError:
                return False

        wait_for(serving, 90, "shallow web to serve its page")
        yield s
    finally:
        procs.stop_all()
        redis.stop()


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.fail("no Chromium: install Debian's chromium (apt-get install chromium); .ci/run does")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("SHALLOW_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea:not([disabled])")  # the session is open
    return page


def messages(page, log: str, who: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#{log} [data-testid='{who}']").all_inner_texts()]


def wait_reply(page, log: str, count: int, timeout: float = 180) -> tuple[str, list[str]]:
    """The text of the `count`-th bot message once it is final, and every state of it seen on the way."""
    seen: list[str] = []

    def final():
        bot = messages(page, log, "bot")
        if len(bot) < count:
            return False
        text = bot[count - 1]
        if not seen or seen[-1] != text:
            seen.append(text)
        return text and not text.endswith(WRITING_MARK.strip()) and not text.startswith(BUSY)

    wait_for(final, timeout, f"reply {count} in {log}", interval=0.05)
    return seen[-1], seen


def words(text: str) -> str:
    return " ".join(text.split())


def notice(page, tab: str) -> str:
    return page.locator(f"#{tab}-notice").inner_text().strip()


def test_the_chat_tab_streams_a_reply(stack, browser, screenshots):
    page = open_page(browser, stack.url)
    page.fill("#chat-input textarea", "Hello! What can you tell me about the sea?")
    page.press("#chat-input textarea", "Enter")
    final, seen = wait_reply(page, "chat-log", 1)
    assert messages(page, "chat-log", "user") == ["Hello! What can you tell me about the sea?"]
    assert page.input_value("#chat-input textarea") == ""
    partial = [s for s in seen if s.endswith(WRITING_MARK.strip())]
    assert len(partial) >= 2, seen  # it was shown as it was written, not all at once
    assert words(final).startswith(words(partial[-1][: -len(WRITING_MARK.strip())]))
    (channel,) = stack.web_channels("chat")
    history = stack.client.store.history(f"web:{channel}:chat", Mode.CHAT)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert words(final) == words(history[-1]["content"])
    # the second turn has the first as context, in the same conversation
    page.fill("#chat-input textarea", "Tell me more.")
    page.click("#chat-send")
    wait_reply(page, "chat-log", 2)
    assert len(stack.client.store.history(f"web:{channel}:chat", Mode.CHAT)) == 4
    page.screenshot(path=str(screenshots / "web-chat.png"))
    page.context.close()


def test_the_story_tab_plays_from_a_title(stack, browser, screenshots):
    page = open_page(browser, stack.url)
    page.get_by_role("tab", name="Story").click()
    page.fill("#story-title textarea", "The Lost Crown")
    page.click("#story-start")
    wait_reply(page, "story-log", 1)
    assert page.locator("#story-heading").inner_text().strip() == "The Lost Crown"
    (channel,) = stack.web_channels("story")
    story = stack.client.store.get(f"web:{channel}:story", Mode.STORY)
    assert story is not None and 2 <= len(story.choices) <= 4
    buttons = page.locator(".story-choice:visible")
    wait_for(lambda: buttons.count() == len(story.choices) and buttons.first.is_enabled(), 30, "the choice buttons")
    assert [b.strip() for b in buttons.all_inner_texts()] == [f"{i}. {c}" for i, c in enumerate(story.choices, 1)]
    first_passage = messages(page, "story-log", "bot")[0]
    assert "What do you do?" not in first_passage  # the menu is the buttons, not text

    chosen = story.choices[0]
    page.click("#story-choice-1")
    wait_reply(page, "story-log", 2)
    assert messages(page, "story-log", "user")[-1] == f"▶ {chosen}"
    turns = stack.client.store.history(f"web:{channel}:story", Mode.STORY)
    assert [t["content"] for t in turns if t["role"] == "user"] == ["/story The Lost Crown", "1"]
    assert stack.client.store.get(f"web:{channel}:story", Mode.STORY).turns == 2

    page.fill("#story-action textarea", "I put on the crown and look into the mirror")
    page.press("#story-action textarea", "Enter")
    wait_reply(page, "story-log", 3)
    assert messages(page, "story-log", "user")[-1] == "▶ I put on the crown and look into the mirror"
    wait_for(lambda: page.locator(".story-choice:visible").count() == 0 or page.locator("#story-choice-1").is_enabled(),
             30, "the next choices")
    page.screenshot(path=str(screenshots / "web-story.png"))

    # a reload finds the same story, choices included
    page.reload()
    page.wait_for_selector("#chat-input textarea:not([disabled])")
    page.get_by_role("tab", name="Story").click()
    wait_for(lambda: len(messages(page, "story-log", "bot")) == 3, 30, "the story after a reload")
    assert messages(page, "story-log", "user")[1] == f"▶ {chosen}"
    page.context.close()


def test_two_browsers_keep_separate_conversations(stack, browser):
    before = set(stack.web_channels("chat"))
    a, b = open_page(browser, stack.url), open_page(browser, stack.url)
    a.fill("#chat-input textarea", "My name is Ada. Describe a lighthouse.")
    a.press("#chat-input textarea", "Enter")
    wait_for(lambda: messages(a, "chat-log", "bot"), 30, "A's reply to start")
    b.fill("#chat-input textarea", "My name is Bo. Describe a forest.")
    b.press("#chat-input textarea", "Enter")  # one worker: B waits behind A and is told so
    _, seen_b = wait_reply(b, "chat-log", 1)
    wait_reply(a, "chat-log", 1)
    assert any(s.startswith("⏳ Queued") for s in seen_b), seen_b
    assert messages(a, "chat-log", "user") == ["My name is Ada. Describe a lighthouse."]
    assert messages(b, "chat-log", "user") == ["My name is Bo. Describe a forest."]
    new = set(stack.web_channels("chat")) - before
    assert len(new) == 2
    firsts = {stack.client.store.history(f"web:{c}:chat", Mode.CHAT)[0]["content"] for c in new}
    assert firsts == {"My name is Ada. Describe a lighthouse.", "My name is Bo. Describe a forest."}
    # a reload keeps the browser's own conversation; "New conversation" forgets it
    a.reload()
    a.wait_for_selector("#chat-input textarea:not([disabled])")
    wait_for(lambda: messages(a, "chat-log", "user") == ["My name is Ada. Describe a lighthouse."], 30, "A's chat after a reload")
    a.click("#chat-reset")
    wait_for(lambda: not messages(a, "chat-log", "user"), 30, "the chat to be cleared")
    assert "Forgotten" in notice(a, "chat")
    assert len(set(stack.web_channels("chat")) - before) == 1  # B's conversation is still there
    a.context.close()
    b.context.close()


def test_bad_input_gets_a_clear_message_and_nothing_is_queued(stack, browser):
    page = open_page(browser, stack.url)
    jobs_before = len(stack.client.r.keys("rq:job:*"))
    page.click("#chat-send")
    wait_for(lambda: "empty" in notice(page, "chat"), 30, "the empty-message notice")
    long_text = "x" * (MAX_INPUT + 1)
    page.fill("#chat-input textarea", long_text)
    page.press("#chat-input textarea", "Enter")
    wait_for(lambda: f"the limit is {MAX_INPUT}" in notice(page, "chat"), 30, "the too-long notice")
    assert page.input_value("#chat-input textarea") == long_text  # kept, to be shortened
    assert not messages(page, "chat-log", "user")

    page.get_by_role("tab", name="Story").click()
    page.fill("#story-action textarea", "I open the door")
    page.press("#story-action textarea", "Enter")
    wait_for(lambda: "no story running" in notice(page, "story"), 30, "the no-story notice")
    page.click("#story-start")
    wait_for(lambda: "needs a title" in notice(page, "story"), 30, "the no-title notice")
    page.fill("#story-title textarea", "T" * 101)
    page.click("#story-start")
    wait_for(lambda: "the limit is 100" in notice(page, "story"), 30, "the long-title notice")
    assert len(stack.client.r.keys("rq:job:*")) == jobs_before
    page.context.close()


def test_without_a_worker_the_message_waits_and_is_answered_when_one_starts(stack, browser):
    stack.procs.kill(stack.worker, signal.SIGTERM)
    wait_for(lambda: stack.client.workers_alive() == 0, 60, "the worker to leave")
    page = open_page(browser, stack.url)
    page.fill("#chat-input textarea", "Is anyone there?")
    page.press("#chat-input textarea", "Enter")
    wait_for(lambda: any("No worker is running" in m for m in messages(page, "chat-log", "bot")), 30, "the no-worker notice")
    time.sleep(1)
    stack.start_worker()
    final, _ = wait_reply(page, "chat-log", 1)
    assert "No worker" not in final
    page.context.close()


def test_a_password_protects_the_page(env, processes):
    """SHALLOW_WEB_PASSWORD turns on Gradio's login: nothing is served without it."""
    import urllib.error
    import urllib.parse

    port = free_port()
    web = processes.start(["web", "--port", str(port)], env.vars(SHALLOW_WEB_PASSWORD="s3cret", SHALLOW_WEB_USER="ada"), "web-auth")
    url = f"http://127.0.0.1:{port}"

    def status(path: str, data: dict | None = None) -> int:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        try:
            return urllib.request.urlopen(url + path, data=body, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            if web.poll() is not None:
                raise AssertionError(web.log_path.read_text()[-2000:]) from None
            return 0

    wait_for(lambda: status("/config") == 401, 90, "the page to ask for a login")
    assert status("/login", {"username": "ada", "password": "wrong"}) == 400
    assert status("/login", {"username": "ada", "password": "s3cret"}) == 200
