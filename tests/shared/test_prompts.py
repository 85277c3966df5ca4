from __future__ import annotations

import random

import pytest

from shared.prompts import clean_choice, fit_messages, parse_choices, story_action, story_system_prompt


def test_parse_choices_takes_the_final_numbered_list():
    text = "You stand at the gate.\n\nWhat do you do?\n1. Knock on the gate\n2) Climb the wall\n3. Walk away\n"
    passage, choices = parse_choices(text)
    assert passage == "You stand at the gate."
    assert choices == ["Knock on the gate", "Climb the wall", "Walk away"]


def test_parse_choices_ignores_a_list_inside_the_story_and_markup():
    text = "Your map says:\n1. the river\n2. the hill\nYou fold it.\n**1.** **Cross the river**\n**2.** Climb the hill"
    passage, choices = parse_choices(text)
    assert choices == ["Cross the river", "Climb the hill"]
    assert passage.endswith("You fold it.")


@pytest.mark.parametrize(
    "text",
    [
        "Just a passage with no choices.",
        "A passage.\n1. Only one choice",
        "A passage.\n2. Starts at two\n3. And three",
        "A passage.\n1. One\n3. Skips two",
    ],
)
def test_parse_choices_refuses_what_is_not_a_menu(text):
    passage, choices = parse_choices(text)
    assert choices == []
    assert passage == text.strip()


def test_parse_choices_keeps_at_most_four():
    text = "Go.\n" + "\n".join(f"{n}. Option {n}" for n in range(1, 7))
    assert parse_choices(text)[1] == ["Option 1", "Option 2", "Option 3", "Option 4"]


def test_story_action_maps_numbers_to_choices_and_keeps_free_text():
    choices = ["Open the door", "Run"]
    assert story_action("2", choices) == "I choose: Run"
    assert story_action(" 1. ", choices) == "I choose: Open the door"
    assert story_action("3", choices) == "3"  # not a choice on offer: taken as typed
    assert story_action("I light a torch", choices) == "I light a torch"


def test_clean_choice_tidies_one_line():
    assert clean_choice(' **Open the door**\n2. Run') == "Open the door"
    assert clean_choice("   ") == ""
    assert clean_choice("1. I look around") == "I look around"  # a repeated number goes
    assert clean_choice("10 feet away, I run") == "10 feet away, I run"  # a number that is part of the text stays
    assert clean_choice("4.") == "" and clean_choice("1. 2.") == "" and clean_choice("…") == ""  # no letters: no choice


def test_story_prompt_names_the_title_and_asks_for_numbered_choices():
    prompt = story_system_prompt("The Lost Crown")
    assert '"The Lost Crown"' in prompt and "numbered choices" in prompt


def _history(n_pairs: int, rng: random.Random) -> list[dict[str, str]]:
    words = "crown river castle dragon lantern forest key riddle storm tower".split()
    out = []
    for i in range(n_pairs):
        out.append({"role": "user", "content": f"turn {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 40)))})
        out.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 80)))})
    return out


def test_trimming_keeps_every_prompt_within_the_budget_and_keeps_as_much_as_fits(tokenizer):
    def count(messages):
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    rng = random.Random(7)
    system = "You are a helpful assistant."
    for trial in range(25):
        history = _history(rng.randint(0, 12), rng)
        user = "What next? " * rng.randint(1, 30)
        budget = rng.randint(60, 900)
        msgs = fit_messages(system, history, user, count, budget)
        assert count(msgs) <= budget, (trial, budget)
        kept = msgs[1:-1]
        assert kept == history[len(history) - len(kept):] if kept else True  # a suffix of the history
        if kept:
            assert kept[0]["role"] == "user"
        assert msgs[0] == {"role": "system", "content": system}
        if len(kept) < len(history) and msgs[-1]["content"] == user:
            # one more pair would not have fitted
            more = history[len(history) - len(kept) - 2:]
            assert count([msgs[0], *more, msgs[-1]]) > budget


def test_trimming_cuts_an_overlong_new_message_from_its_start(tokenizer):
    def count(messages):
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    user = " ".join(f"word{i}" for i in range(400)) + " FINAL QUESTION"
    msgs = fit_messages("Be brief.", [], user, count, 120)
    assert count(msgs) <= 120
    assert msgs[-1]["content"].endswith("FINAL QUESTION")


def test_a_long_history_is_fitted_with_few_whole_prompt_counts_and_the_same_result(tokenizer):
    """A busy channel's history is long, and each whole-prompt count renders and tokenizes all that is kept
    (milliseconds for a few thousand tokens). With the messages' own counts (`text_tokens`, cached by the worker) the
    search starts where they say the budget ends: at most 3 whole counts here, against 7-10 without, and the same
    messages kept as the search without them."""
    import functools

    def count(messages):
        calls.append(len(messages))
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    text_tokens = functools.lru_cache(maxsize=None)(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    rng = random.Random(11)
    for trial in range(12):
        history = _history(rng.randint(40, 150), rng)
        if trial % 3 == 0:
            history = history[1:]  # a history read from its end may open with a reply
        user = "And then? " * rng.randint(1, 20)
        budget = rng.randint(300, 3000)
        calls: list[int] = []
        plain = fit_messages("Be brief.", history, user, count, budget)
        plain_counts = len(calls)
        calls = []
        guided = fit_messages("Be brief.", history, user, count, budget, text_tokens)
        assert guided == plain, trial
        assert count(guided) <= budget
        assert len(calls) <= 3 < plain_counts, (trial, len(calls), plain_counts)


def test_the_search_finds_the_first_length_that_fits_from_any_guess_with_two_looks_when_the_guess_is_right():
    """`_first_fitting` over every place the budget can end (or none), from every guess."""
    from shared.prompts import _first_fitting

    for n in range(1, 13):
        for first in range(n + 1):  # fits(i) from i = first on; first == n: nothing fits
            for guess in range(n):
                looks = []

                def fits(i, first=first, looks=looks):
                    assert 0 <= i < n
                    looks.append(i)
                    return i >= first

                assert _first_fitting(fits, n, guess) == (first if first < n else None), (n, first, guess)
                if guess == first or (guess == first - 1 and first < n):
                    assert len(looks) <= 2, (n, first, guess, looks)
