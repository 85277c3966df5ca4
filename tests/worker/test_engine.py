"""The slot engine (worker/engine.py) against the transformers backend, on the CPU with SmolLM2.

Greedy decoding is deterministic, so the batched backend's replies, written side by side in shared
forward passes (rows moved, the window shifted, requests waiting for a free row), must equal the ones
`generate` writes for each prompt alone, repetition penalty included.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from shared.settings import Settings

PROMPTS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is your favourite ship and why?"}],
    [{"role": "user", "content": "Count to twenty."}],
    [{"role": "user", "content": "Write a poem about a cat."}],
    [{"role": "user", "content": "Name three rivers."}],
]
LENGTHS = [40, 12, 70, 30, 55]


@pytest.fixture(scope="module")
def backends(model_dir):
    from worker.backends import load_backend

    settings = dataclasses.replace(Settings.from_env(), base_model=model_dir, adapter=None)
    reference = load_backend(dataclasses.replace(settings, backend="transformers"))
    # 3 rows for 5 requests: some wait for a row; 160-token rows: the live window is shifted back while they run
    batched = load_backend(dataclasses.replace(settings, backend="batched", slots=3, context_tokens=160))
    # as on a GPU: one launch queued ahead of the one handed out (the CPU default is none: nothing runs ahead
    # there), so that these tests go through the bookkeeping of launches in flight
    batched.engine.ahead = 1
    yield reference, batched, dataclasses.replace(settings.generation, temperature=0.0, repetition_penalty=1.1)
    batched.close()


def test_replies_written_together_equal_each_written_alone(backends):
    reference, batched, greedy = backends
    assert "slot engine" in batched.description
    alone = ["".join(reference.stream(p, greedy, max_new_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, LENGTHS)]
    together: list[str | None] = [None] * len(PROMPTS)
    counts: list[int] = [0] * len(PROMPTS)

    def run(i: int) -> None:
        time.sleep(0.4 * i)  # they arrive while the others are being written
        gen = batched.stream(PROMPTS[i], greedy, max_new_tokens=LENGTHS[i], ignore_eos=True)
        together[i] = "".join(gen)
        counts[i] = gen.completion_tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    assert counts == LENGTHS
    engine = batched.engine
    assert not engine.live and not engine.waiting  # every row given back


def test_a_cancelled_reply_stops_alone(backends):
    reference, batched, greedy = backends
    expected = "".join(reference.stream(PROMPTS[2], greedy, max_new_tokens=60, ignore_eos=True))
    stop = threading.Event()
    seen: list[str] = []
    kept: dict[str, object] = {}

    def cancelled() -> None:
        gen = batched.stream(PROMPTS[0], greedy, max_new_tokens=120, ignore_eos=True, should_stop=stop.is_set)
        for piece in gen:
            seen.append(piece)
            if len(seen) == 3:
                stop.set()
        kept["reason"] = gen.finish_reason

    def other() -> None:
        kept["text"] = "".join(batched.stream(PROMPTS[2], greedy, max_new_tokens=60, ignore_eos=True))

    threads = [threading.Thread(target=cancelled), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert kept["reason"] == "cancelled"
    assert len(seen) < 20  # it stopped within a few steps of the cancel, not at its 120-token limit
    assert kept["text"] == expected
    deadline = time.monotonic() + 10
    while batched.engine.live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batched.engine.live


def test_end_of_sequence_ends_a_reply_and_a_long_prompt_is_refused(backends):
    reference, batched, greedy = backends
    short = [{"role": "user", "content": "Say only the word yes."}]
    expected = reference.stream(short, greedy, max_new_tokens=40)
    text = "".join(expected)
    gen = batched.stream(short, greedy, max_new_tokens=40)
    assert "".join(gen) == text
    assert gen.completion_tokens == expected.completion_tokens < 40 and gen.finish_reason == "stop"
    too_long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ValueError, match="does not fit"):
        "".join(batched.stream(too_long, greedy, max_new_tokens=10))


def test_sampling_rules():
    import torch

    from worker.engine import sample

    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [1.0, 3.0, 2.0, -1.0], [1.0, 3.0, 2.0, -1.0]])
    seen = torch.tensor([[False] * 4, [False, True, False, False], [False] * 4])
    temperature = torch.tensor([0.0, 0.0, 1.0])
    top_p = torch.tensor([1.0, 1.0, 0.01])  # the third row keeps only its most likely token
    penalty = torch.tensor([1.0, 2.0, 1.0])  # the second row's seen best token drops to 1.5, below 2.0
    for _ in range(20):
        assert sample(logits, temperature, top_p, penalty, seen).tolist() == [1, 2, 1]
    wide = sample(logits.repeat(200, 1)[:200], torch.full((200,), 1.0), torch.ones(200), torch.ones(200),
                  torch.zeros(200, 4, dtype=torch.bool))
    assert set(wide.tolist()) >= {0, 1, 2}  # a real draw: more than the best token comes up


def test_top_k_in_two_stages_equals_torch_topk():
    import torch

    from worker.engine import CHUNK, sample, top_k

    # a Llama-3 vocabulary (not a multiple of the chunk: padded), SmolLM2's, and one too small to split
    for width in (128256, 49152, CHUNK + 1, 7):
        x = torch.randn(3, width)
        k = min(50, width)
        expected = x.topk(k, dim=-1)
        values, indices = top_k(x, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    # greedy rows read their token from the same selection: the best one, as argmax would
    x = torch.randn(4, 128256)
    picked = sample(x, torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4, 128256, dtype=torch.bool))
    assert torch.equal(picked, x.argmax(-1))


def test_the_paged_engine_still_answers(model_dir):
    from worker.backends import load_backend

    settings = dataclasses.replace(Settings.from_env(), base_model=model_dir, adapter=None, backend="batched",
                                   batch_engine="paged", slots=2, context_tokens=512)
    backend = load_backend(settings)
    try:
        assert "paged engine" in backend.description
        gens = [backend.stream(p, settings.generation, max_new_tokens=10, ignore_eos=True) for p in PROMPTS[:2]]
        texts: list[str] = [""] * 2
        threads = [threading.Thread(target=lambda i=i: texts.__setitem__(i, "".join(gens[i]))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(t.strip() for t in texts)
        assert [g.completion_tokens for g in gens] == [10, 10] and all(g.finish_reason == "length" for g in gens)
    finally:
        backend.close()


def test_a_prompt_that_fails_in_the_model_gets_its_error_and_the_engine_goes_on(backends):
    from worker.engine import Request

    reference, batched, greedy = backends
    engine = batched.engine
    bad = Request(ids=[10**9, 1, 2], max_new_tokens=5, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    engine.submit(bad)  # a token id past the vocabulary: the prefill's embedding lookup raises
    item = bad.out.get(timeout=60)
    assert isinstance(item, RuntimeError) and "generation failed" in str(item)
    prompt = [{"role": "user", "content": "Name three rivers."}]
    expected = "".join(reference.stream(prompt, greedy, max_new_tokens=12, ignore_eos=True))
    assert "".join(batched.stream(prompt, greedy, max_new_tokens=12, ignore_eos=True)) == expected
    assert not engine.live and not engine.waiting and not engine.admitting


def test_a_prompt_counted_then_streamed_is_rendered_once(backends):
    """fit_messages counts the prompt, then the reply streams it: the chat template and the tokenizer run once
    for both, the ids are the same, and the reuse lasts one call (a later turn renders its prompt afresh)."""
    from shared.prompts import fit_messages

    reference, batched, gen = backends
    for backend in (reference, batched):
        tokenizer = backend.tokenizer
        real = tokenizer.apply_chat_template
        calls = []

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        fresh = list(real(PROMPTS[1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        tokenizer.apply_chat_template = counting
        try:
            messages = fit_messages(PROMPTS[1][0]["content"], [], PROMPTS[1][1]["content"], backend.count_tokens, 500)
            assert messages == PROMPTS[1] and len(calls) == 1  # counted (fit_messages: everything fits) ...
            gen_out = backend.stream(messages, gen, max_new_tokens=4)
            assert "".join(gen_out) and gen_out.prompt_tokens == len(fresh)
            assert len(calls) == 1  # ... and streamed without rendering it again
            assert backend.encode(messages) == fresh and len(calls) == 2  # once only: then rendered afresh
            assert backend.encode([{"role": "user", "content": "Other."}]) != fresh and len(calls) == 3
        finally:
            tokenizer.apply_chat_template = real


def test_a_long_history_is_fitted_in_few_renders_and_the_prompt_kept_is_not_rendered_again(backends):
    """A long history: fit_messages, guided by the backend's cached per-message counts, renders the whole prompt two or
    three times, and the reply then streams the prompt it kept without rendering it again, even when it was not the
    last one counted (the search's last look is often the next longer one, which did not fit: the backend keeps its
    last few prompts); its ids are those of a fresh render."""
    from shared.prompts import fit_messages

    reference, _, gen = backends
    tokenizer = reference.tokenizer
    real = tokenizer.apply_chat_template
    history = []
    for n in range(60):
        history += [{"role": "user", "content": f"Question {n}: what is the river number {n} like?"},
                    {"role": "assistant", "content": f"River {n} is long and slow, " + "and wide " * (n % 7)}]
    rendered = []

    def counting(messages, *args, **kwargs):
        rendered.append(messages)
        return real(messages, *args, **kwargs)

    not_last = 0
    for budget in range(400, 1400, 100):
        rendered.clear()
        tokenizer.apply_chat_template = counting
        try:
            messages = fit_messages("Be brief.", history, "And the sea?", reference.count_tokens, budget, reference.text_tokens)
            counted = len(rendered)
            assert 2 <= counted <= 3 and 2 < len(messages) < len(history) + 2, (budget, counted)
            not_last += rendered[-1] != messages
            out = reference.stream(messages, gen, max_new_tokens=1)
            "".join(out)
            assert len(rendered) == counted, budget  # streamed from the ids kept while counting
        finally:
            tokenizer.apply_chat_template = real
        fresh = real(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert out.prompt_tokens == len(fresh) <= budget
    assert not_last > 0  # the case the backend's few kept prompts are for came up


def test_a_reply_asked_for_its_timeline_gets_each_step_in_order(backends):
    """`Request.marks` (what `bench.first_token` prints): admitted, prefill queued, first launch queued, first
    tokens ready, each once and in that order; a request that did not ask records nothing."""
    from worker.engine import Request

    _, batched, greedy = backends
    ids = batched.encode(PROMPTS[1])
    asked = Request(ids=ids, max_new_tokens=9, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.1, marks=[])
    plain = Request(ids=ids, max_new_tokens=9, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.1)
    for request in (asked, plain):
        batched.engine.submit(request)
        got = []
        while (item := request.out.get(timeout=120)) is not None:
            assert not isinstance(item, BaseException)
            got += item
        assert len(got) == 9
    assert [name for name, _ in asked.marks] == ["admit", "prefill queued", "first launch queued", "first tokens ready"]
    times = [t for _, t in asked.marks]
    assert times == sorted(times)
    assert plain.marks is None


def test_a_reply_gets_the_steps_it_needs_and_no_launch_past_its_limit(backends):
    """One reply alone (4 steps a launch here): its first launch has no steps, so that the prefill's token goes
    out at once; then 10 tokens are that one and 9 steps, launches of 4, 4 and 1, and none queued ahead after the
    last (it would only be thrown away, and the next reply's prefill would wait behind it)."""
    from worker.engine import Request

    _, batched, _ = backends
    engine = batched.engine
    ids = batched.encode(PROMPTS[4])
    for tokens, steps in ((10, [0, 4, 4, 1]), (9, [0, 4, 4]), (1, [0])):
        request = Request(ids=ids, max_new_tokens=tokens, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.0)
        before = engine.launches
        engine.submit(request)
        got = []
        while (item := request.out.get(timeout=120)) is not None:
            assert not isinstance(item, BaseException)
            got += item
        assert len(got) == tokens
        time.sleep(0.3)  # the engine would have queued a launch ahead by now
        assert engine.launches - before == len(steps)
        assert request.queued == tokens
