# session 26 (CPU, 2 cores): fitting a long session's history into a 4,096-token prompt, before and after the change.
# Before: shared/prompts.py of 3c377fa, checked out with `git worktree add /tmp/wt_before 3c377fa`, reading the whole history;
# after: this tree, reading the last 1,024 messages (worker.jobs.history_room) with the messages' own counts cached
# (the turn before counted them). Tokenizer: SmolLM2's (python -m bench.tiny_model /tmp/tiny). Run from the project root.
import functools, random, sys, time, importlib.util
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/tiny")
def load(path):
    spec = importlib.util.spec_from_file_location("p" + str(abs(hash(path))), path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
old = load("/tmp/wt_before/shared/prompts.py"); new = load("/work/main/shared/prompts.py")
def count(m):
    return len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
text_tokens = functools.lru_cache(maxsize=16384)(lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
rng = random.Random(5)
words = "crown river castle dragon lantern forest key riddle storm tower".split()
print("| exchanges in the session | reply words | before: ms a turn (whole-prompt counts) | after: ms a turn (counts) | messages kept |")
print("|---|---|---|---|---|")
for pairs, reply in ((100, 60), (300, 60), (1000, 60), (1000, 14)):
    hist = []
    for i in range(pairs):
        hist.append({"role": "user", "content": f"turn {i}: " + " ".join(rng.choices(words, k=rng.randint(3, 20)))})
        hist.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, reply)))})
    res = {}
    for name, mod, h, tt in (("old", old, hist, None), ("new", new, hist[-(4096 // 4):], text_tokens)):
        calls = [0]
        def c(m): calls[0] += 1; return count(m)
        if tt: mod.fit_messages("Be brief.", h, "And then?", c, 4096 - 128, tt)  # the turn before: its messages counted
        calls[0] = 0; t = time.perf_counter()
        out = mod.fit_messages("Be brief.", h, "And then?", c, 4096 - 128, tt) if tt else mod.fit_messages("Be brief.", h, "And then?", c, 4096 - 128)
        res[name] = (round((time.perf_counter() - t) * 1000, 1), calls[0], len(out) - 2)
    assert res["old"][2] == res["new"][2]
    print(f"| {pairs} | 1-{reply} | {res['old'][0]} ({res['old'][1]}) | {res['new'][0]} ({res['new'][1]}) | {res['new'][2]} |")
