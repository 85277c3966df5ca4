"""FineTome-shaped conversations for tests and benchmarks where the real dataset cannot be fetched.

Lengths follow the real set's shape (mostly 200-1,500 tokens a conversation); the words are random,
so losses mean nothing, but speed and memory are those of real data of that length.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there would their we him been has when who will more no if out so said what up its about into "
         "than them can only other new some could time these two may then do first any my now such like our over man me "
         "even most made after also did many before must through back years where much your way well down should because "
         "each just those people how too little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old year off come since against go "
         "came right used take three crown river dragon castle forest lantern riddle storm tower").split()


def write_finetome_like(path: Path, n: int, seed: int = 0) -> Path:
    """n ShareGPT rows (`conversations` of {from, value}), 1-3 exchanges, about 200-1,500 tokens each."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            target_words = int(min(1500, max(200, rng.lognormvariate(6.3, 0.5))) * 0.75)  # ~0.75 words a token
            turns = rng.choice([1, 1, 2, 3])
            convo = []
            for t in range(turns):
                q = max(8, target_words // (turns * 5))
                a = max(20, target_words // turns - q)
                convo.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=q)) + "?"})
                convo.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=a)) + "."})
            f.write(json.dumps({"conversations": convo}) + "\n")
    return path
