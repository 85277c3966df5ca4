"""`--length-passes N`: each step's padded batch sorted by length and trained in N passes, the same step."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from shared.errors import ConfigError
from tests.training.test_train import run_train
from training.length_passes import PLAN, PlannedCollator, cut, padded_share, pass_rows, plan_passes

WORDS = "the sea mountains bread dragons moon rivers castles owls sail wind storm gold map".split()


def write_varied(path: Path, n: int = 40, seed: int = 1) -> Path:
    """Conversations of very different lengths (3 to 70 words in the reply), so that padding is most of a batch."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choice([3, 8, 20, 40, 70])
            f.write(json.dumps({"conversations": [
                {"from": "human", "value": f"Tell me about {WORDS[i % len(WORDS)]}."},
                {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(words))},
            ]}) + "\n")
    return path


def right_padded(lengths: list[int], width: int) -> dict:
    rows = len(lengths)
    ids = torch.arange(rows * width).reshape(rows, width) + 1
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels, "note": "kept"}


def test_a_right_padded_batch_is_sorted_by_length_and_each_pass_cut_to_its_longest_row():
    batch = right_padded([5, 2, 9, 3, 7], 9)
    planned, plan = plan_passes(batch, 2)
    assert plan == [(0, 3, 5), (3, 5, 9)]  # ceil(5 / 2) = 3 rows a pass: lengths 2, 3, 5 | 7, 9
    assert planned["attention_mask"].sum(1).tolist() == [2, 3, 5, 7, 9]
    assert planned["note"] == "kept"
    rows = {tuple(r) for r in batch["input_ids"].tolist()}
    assert {tuple(r) for r in planned["input_ids"].tolist()} == rows  # the same rows, reordered
    passes = [cut(planned, *p) for p in plan]
    assert [tuple(p["input_ids"].shape) for p in passes] == [(3, 5), (2, 9)]
    assert all(p["labels"].is_contiguous() for p in passes)
    # nothing real is cut: every target token is in exactly one pass
    assert sum(int((p["labels"] != -100).sum()) for p in passes) == int((batch["labels"] != -100).sum()) == 26
    assert sum(p["input_ids"].numel() for p in passes) == 33 < batch["input_ids"].numel() == 45  # less padding computed
    # more passes than rows: a pass a row
    assert plan_passes(right_padded([4, 1], 4), 8)[1] == [(0, 1, 1), (1, 2, 4)]
    # rows padded to a multiple (--pad-to-multiple-of): each pass's width too, within the batch's own
    assert plan_passes(right_padded([5, 2, 9, 3, 7], 16), 2, multiple=4)[1] == [(0, 3, 8), (3, 5, 12)]
    assert plan_passes(right_padded([5, 9], 10), 2, multiple=8)[1] == [(0, 1, 8), (1, 2, 10)]


def test_pass_rows_are_the_row_counts_the_plans_cut():
    """What `--block-cuda-graphs` sizes unsloth's shape cap by: every pass's row count that a plan can cut, and the
    whole batch's (a batch that stays one pass), nothing else."""
    for rows in range(1, 10):
        for passes in range(1, 6):
            seen = {rows}
            lengths = [random.Random(rows * 10 + passes).randint(1, 20) for _ in range(rows)]
            plan = plan_passes(right_padded(lengths, 20), passes)[1]
            if not isinstance(plan, str):  # one row: one pass
                seen |= {stop - start for start, stop, _ in plan}
            assert pass_rows(rows, passes) == seen, (rows, passes)
    assert pass_rows(8, 2) == {4, 8} and pass_rows(8, 3) == {2, 3, 8} and pass_rows(8, 1) == {8}


@pytest.mark.parametrize("batch, why", [
    ({"input_ids": torch.ones(1, 30, dtype=torch.long), "position_ids": torch.arange(30)[None]},
     "no padding (padding-free or packed rows)"),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])},
     "not right-padded"),
    ({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}, "one row"),
])
def test_a_batch_with_nothing_to_cut_stays_one_pass_and_says_why(batch, why):
    planned, plan = plan_passes(batch, 2)
    assert plan == why and planned is batch
    assert plan_passes(right_padded([3, 1], 3), 1)[1] == "one pass asked"
    # the collator of the training loader carries the plan, or the reason, to the training step
    assert PlannedCollator(lambda features: batch, 2)([])[PLAN] == why


def test_only_the_training_loader_gets_the_planning_collator_and_a_step_without_a_count_is_one_pass():
    """What `install` changes on a Trainer, seen on a stand-in with the two methods it wraps: the training loader is
    built with the planning collator, and the Trainer's own collator (which evaluation uses) is left as it was."""
    from training.length_passes import install

    calls = []

    class Trainer:
        def __init__(self):
            self.data_collator = lambda features: right_padded([3, 1, 2, 4], 4)

        def get_train_dataloader(self):
            return self.data_collator  # what the Trainer hands the DataLoader as its collate_fn

        def training_step(self, model, inputs, num_items_in_batch=None):
            calls.append((tuple(inputs["input_ids"].shape), num_items_in_batch))
            return torch.tensor(float(inputs["attention_mask"].sum()))

    trainer = Trainer()
    own = trainer.data_collator
    record = install(trainer, 2)
    collate = trainer.get_train_dataloader()
    assert isinstance(collate, PlannedCollator) and trainer.data_collator is own
    loss = trainer.training_step(None, collate([]), num_items_in_batch=7)
    assert calls == [((2, 2), 7), ((2, 4), 7)] and float(loss) == 10  # the passes' losses add up to the step's
    assert trainer.training_step(None, collate([]), num_items_in_batch=None) is not None
    assert calls[-1] == ((4, 4), None)  # without the step's count, each pass would be its own mean: one pass
    trainer.training_step(None, own([]), num_items_in_batch=7)  # a batch the planning collator never saw
    assert record == {"asked": 2, "batches_split": 1, "passes": 2,
                      "one_pass": {"no count of the step's target tokens": 1, "not planned": 1}}
    assert install(Trainer(), 1) == {"asked": 1, "batches_split": 0, "passes": 0, "one_pass": {}}


def test_the_share_of_real_tokens_grows_with_passes():
    # rows of 100 and 300, two a batch: a quarter are 100+100, half 100+300 (600 computed), a quarter 300+300
    mixed = padded_share([100, 300], 2, 1, draws=20000)
    assert mixed["rows"] == 2 and abs(mixed["real_tokens"] - 400) < 8 and abs(mixed["padded_tokens"] - 500) < 8
    assert abs(mixed["real_share"] - 0.8) < 0.01
    assert padded_share([100, 300], 2, 2, draws=2000)["real_share"] == 1.0  # a pass a row: nothing padded
    lengths = list(range(100, 1500, 7))
    one, two, four = (padded_share(lengths, 8, n) for n in (1, 2, 4))
    assert one["real_tokens"] == two["real_tokens"] == four["real_tokens"]  # the same batches drawn
    assert one["real_share"] < two["real_share"] < four["real_share"] <= 1
    assert padded_share([300] * 5, 8, 2)["real_share"] == 1.0
    assert padded_share([300] * 5, 8, 1, multiple=256)["padded_tokens"] == 8 * 512  # rounded up to the multiple
    assert padded_share([300] * 5, 8, 2, multiple=100)["real_share"] == 1.0


def test_length_passes_train_the_same_steps_as_one_pass_and_evaluate_the_same(model_dir, tmp_path):
    """On SmolLM2 (trl's trainer, padded batches): 8 conversations of very different lengths a step, in 1 pass, and in
    3 passes (3 + 3 + 2 rows: uneven) with the rows padded to a multiple of 64 tokens, with a validation split
    evaluated each epoch. The same tokens, and the same loss and gradient norm at every step: each pass's loss is its
    share of the step's one count of target tokens, and padding is masked out."""
    data = write_varied(tmp_path / "varied.jsonl")
    runs = {}
    for passes in (1, 3):
        out = tmp_path / f"run-{passes}"
        proc = run_train(["train", "--base-model", model_dir, "--dataset", str(data), "--output-dir", str(out),
                          "--num-train-epochs", "1", "--save-steps", "100", "--max-seq-length", "192",
                          "--warmup-steps", "1", "--learning-rate", "1e-3", "--eval-fraction", "0.2",
                          "--length-passes", str(passes)] + (["--pad-to-multiple-of", "64"] if passes > 1 else []), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[passes] = json.loads((out / "run.json").read_text()), json.loads((out / "history.json").read_text())
    one, one_history = runs[1]
    steps = one["global_step"]
    assert steps == 4  # 32 training conversations, 8 a step
    assert one["length_passes"] == {"asked": 1, "batches_split": 0, "passes": 0, "one_pass": {}}

    def losses(history):
        return [(h["step"], h["num_input_tokens_seen"], round(h["loss"], 4), round(h["grad_norm"], 3))
                for h in history if "loss" in h]

    def evals(history):
        return [round(h["eval_loss"], 4) for h in history if "eval_loss" in h]

    assert len(losses(one_history)) == steps and len(evals(one_history)) == 1
    record, history = runs[3]
    assert record["config"]["length_passes"] == "3" and one["config"]["length_passes"] == "1"
    assert record["length_passes"] == {"asked": 3, "batches_split": steps, "passes": 3 * steps, "one_pass": {}}
    assert record["config"]["pad_to_multiple_of"] == 64 and one["config"]["pad_to_multiple_of"] is None
    assert record["batches"]["pad_to_multiple_of"] == 64 and one["batches"]["pad_to_multiple_of"] is None  # trl's collator
    assert record["train_tokens"] == one["train_tokens"]
    assert losses(history) == losses(one_history)
    assert evals(history) == evals(one_history)


def test_length_passes_is_auto_or_a_whole_number_and_auto_splits_only_padded_batches_without_cuda(tmp_path):
    from training.length_passes import resolve
    from training.train import parse_config

    cfg = parse_config([])
    assert cfg.length_passes == "auto"
    assert resolve(cfg, cuda=False) == 2 and resolve(cfg, cuda=True) == 1  # CUDA: not measured yet
    assert resolve(parse_config(["--per-device-train-batch-size", "2"]), cuda=False) == 1  # the recipe's 2 x 4
    assert resolve(parse_config(["--packing"]), cuda=False) == 1  # packed rows: no padding to save
    assert resolve(parse_config(["--length-passes", "4"]), cuda=True) == 4
    yaml = tmp_path / "passes.yaml"
    yaml.write_text("length_passes: 3\n")
    assert resolve(parse_config(["--config", str(yaml)]), cuda=True) == 3
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ConfigError, match=f"--length-passes must be auto or a whole number, 1 or more, not '{bad}'"):
            parse_config(["--length-passes", bad])
    yaml.write_text("length_passes: true\n")
    with pytest.raises(ConfigError, match="--length-passes must be auto or a whole number"):
        parse_config(["--config", str(yaml)])
