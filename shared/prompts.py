"""Prompts, story choices, and fitting a conversation into the model's context."""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

Message = dict[str, str]

CHAT_SYSTEM_PROMPT = (
    "You are Shallow, a friendly and helpful assistant chatting with members of an online community. "
    "Answer clearly and briefly, in plain text, and say so when you do not know something."
)

STORY_SYSTEM_PROMPT = (
    'You are the storyteller of an interactive choose-your-own-adventure story titled "{title}". '
    'Tell it in the second person ("you"), one short passage at a time, and continue from what the reader '
    "chooses. Keep the adventure going: never end the story and never decide for the reader. "
    'End every passage with the line "What do you do?" followed by two to four numbered choices, one per line, '
    "for example:\n1. Open the iron door\n2. Follow the footprints\n3. Call out into the dark"
)

STORY_BEGIN = 'Begin the story "{title}".'
STORY_CHOICE = "I choose: {choice}"
# What the worker appends when the model wrote a passage without choices: it then writes them one by one.
CHOICES_LEAD = "\n\nWhat do you do?\n"

MIN_CHOICES, MAX_CHOICES = 2, 4
FALLBACK_CHOICES = ("Look around carefully", "Press on", "Turn back")  # when the model cannot write a menu

_CHOICE_LINE = re.compile(r"^\s*(?:\*\*)?\(?([1-9])[.):]\)?(?:\*\*)?\s+(.+?)\s*$")
_WHAT_NOW = re.compile(r"\s*(?:\*\*)?what (?:do|will) you do(?: next)?\??(?:\*\*)?\s*$", re.IGNORECASE)


def story_system_prompt(title: str) -> str:
    return STORY_SYSTEM_PROMPT.format(title=title)


def story_action(text: str, choices: Sequence[str]) -> str:
    """Turn what the reader typed into the storyteller's next user message: a number picks a choice."""
    stripped = text.strip().rstrip(".")
    if stripped.isdigit() and 1 <= int(stripped) <= len(choices):
        return STORY_CHOICE.format(choice=choices[int(stripped) - 1])
    return text.strip()


def clean_choice(text: str) -> str:
    """One generated choice line, tidied: first line only, no markup or quotes around it.

    A line with no letters in it ("4.", "...") is no choice: the result is empty.
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\(?\d+[.):]\)?\s+", "", line.strip())  # the model repeated the number it was given
    line = line.strip(" *_`\"'").strip()
    return line if any(c.isalpha() for c in line) else ""


def parse_choices(text: str) -> tuple[str, list[str]]:
    """Split a passage into its story text and the 2-4 numbered choices that end it.

    Returns (passage, choices); choices is empty when the text does not end with a numbered list
    starting at 1. Only the last list counts: a numbered list inside the story is not a menu.
    """
    lines = text.rstrip().splitlines()
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    run: list[tuple[int, str]] = []
    i = end - 1
    while i >= 0:
        m = _CHOICE_LINE.match(lines[i])
        if not m:
            break
        run.append((int(m.group(1)), m.group(2)))
        i -= 1
    run.reverse()
    numbers = [n for n, _ in run]
    if len(run) < MIN_CHOICES or numbers != list(range(1, len(run) + 1)):
        return text.strip(), []
    choices = [clean_choice(c) for _, c in run][:MAX_CHOICES]
    if any(not c for c in choices):
        return text.strip(), []
    passage_lines = lines[: i + 1]
    while passage_lines and (not passage_lines[-1].strip() or _WHAT_NOW.match(passage_lines[-1])):
        passage_lines.pop()
    return "\n".join(passage_lines).strip(), choices


def render_choices(choices: Sequence[str]) -> str:
    return "\n".join(f"{n}. {c}" for n, c in enumerate(choices, 1))


MESSAGE_TOKENS = 5  # a chat template's own tokens around one message (Llama-3's header and end of turn; ChatML's)


def fit_messages(
    system: str,
    history: Sequence[Message],
    user_text: str,
    count_tokens: Callable[[list[Message]], int],
    budget: int,
    text_tokens: Callable[[str], int] | None = None,
) -> list[Message]:
    """The longest recent history that keeps the prompt within `budget` tokens of the model's own.

    `count_tokens` counts a whole prompt as the model will see it (chat template and generation
    prompt included). History is dropped from the oldest end, a user/assistant pair at a time so the
    prompt never opens with a reply; if the system prompt and the new message alone are too long,
    the new message is cut from its start, keeping its end (the question is usually last).

    Each count renders and tokenizes the whole prompt, so a long history costs milliseconds a count. With
    `text_tokens` (a message's text alone, counted; cheap when cached) the search starts where the messages'
    own counts say the budget ends, and the whole-prompt counts only confirm it: usually two of them, where a
    search by halves takes one per halving (8 for a history of 300 messages). The result is the same.
    """

    def build(keep: int, text: str) -> list[Message]:
        kept = list(history[len(history) - keep :]) if keep else []
        return [{"role": "system", "content": system}, *kept, {"role": "user", "content": text}]

    # Candidate history lengths, longest first: whole pairs counted from the end, so the kept part starts at a user turn.
    candidates = [k for k in range(len(history), 0, -1) if history[len(history) - k]["role"] == "user"]
    if candidates:
        tokens = functools.cache(lambda i: count_tokens(build(candidates[i], user_text)))
        start = 0  # without estimates, the whole history first (the usual case: it all fits, one count), then halves
        if text_tokens is not None:
            estimate = _estimates(system, history, user_text, candidates, text_tokens)
            start = _within(estimate, budget)
            # the template's real cost, from one whole count, spread over the messages: the next guess is closer
            extra = (tokens(start) - estimate[start]) / candidates[start]
            start = _within([e + extra * k for e, k in zip(estimate, candidates)], budget)
        first = _first_fitting(lambda i: tokens(i) <= budget, len(candidates), start)  # False, then True as i rises
        if first is not None:
            return build(candidates[first], user_text)
    if count_tokens(build(0, user_text)) <= budget:  # no history fits (or there is none): the new message alone
        return build(0, user_text)

    # Even the new message alone is too long: cut it from its start, as little as fits (binary search).
    if count_tokens(build(0, "")) > budget:
        raise ValueError(f"the system prompt alone is over the budget of {budget} tokens")
    lo, hi = 0, len(user_text)  # the smallest cut whose remainder fits; cutting more never costs more
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(build(0, user_text[mid:])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return build(0, user_text[lo:])


def _estimates(system: str, history: Sequence[Message], user_text: str, candidates: list[int],
               text_tokens: Callable[[str], int]) -> list[float]:
    """For each candidate history length, the prompt's tokens as its messages' own counts put them, with
    MESSAGE_TOKENS each for the template (the exact count, rendered, may differ a little)."""
    used = text_tokens(system) + text_tokens(user_text) + 3 * MESSAGE_TOKENS  # and the generation prompt
    totals = [float(used)]  # history length -> estimate
    for k in range(1, len(history) + 1):
        totals.append(totals[-1] + text_tokens(history[len(history) - k]["content"]) + MESSAGE_TOKENS)
    return [totals[k] for k in candidates]


def _within(estimate: list[float], budget: int) -> int:
    """The first candidate (the longest) whose estimate is within the budget (the last, the shortest, if none is)."""
    return next((i for i, e in enumerate(estimate) if e <= budget), len(estimate) - 1)


def _first_fitting(fits: Callable[[int], bool], n: int, guess: int) -> int | None:
    """The smallest i in [0, n) with fits(i), for a `fits` that is False and then True as i rises (None: none does):
    the guess and its neighbour on the side it points to first (two looks when the guess is right), then by halves
    on that side."""
    if fits(guess):
        if guess == 0 or not fits(guess - 1):
            return guess
        lo, hi = 0, guess - 1  # fits(hi)
    else:
        if guess + 1 < n and fits(guess + 1):
            return guess + 1
        lo, hi = guess + 2, n  # hi = n: none may fit
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < n else None
