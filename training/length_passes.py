"""`--length-passes N`: each optimizer step's padded batch, sorted by length, trained in N passes.

A padded batch computes every row at the length of its longest. The lab's 8 conversations a step, drawn at random
from FineTome-shaped data, are 56% real tokens once padded (session 28's bench data). Sorted by length and cut into
2 passes of 4, each padded only to its own longest, they are ~77% real; in 4 passes of 2, ~91%.

The step is the same step: the same conversations (the Trainer's own sampler draws them), and the same loss, because
each pass's loss is a sum divided by the step's one count of target tokens (`num_items_in_batch`, which the Trainer
counts over the whole batch before the step), so the passes' gradients add up to the one pass's. Only the order of
the floating-point sums differs. Where the loss is not divided so (no such count: a model without loss kwargs) or
the batch is not a right-padded one (padding-free or packed rows have no padding to save), the step runs in one pass,
and the record says why.

How: the training loader's collator (only the training loader's: evaluation batches are left alone) sorts the rows
by length and writes the plan (rows and width of each pass) into the batch under PLAN, computed on the host from the
attention mask, so that the training step cuts the batch on the GPU without reading anything back from it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, MutableMapping
from typing import Any

PLAN = "shallow_length_passes"  # the key a planned batch carries from the collator to the training step

AUTO_PASSES_WITHOUT_CUDA = 2  # measured on a 2-core CPU with SmolLM2 (session 29); 4 gained nothing there
AUTO_MIN_ROWS = 4  # rows of a micro-batch for `auto` to split it: passes of 2 rows or more


def resolve(cfg, cuda: bool) -> int:
    """The passes a step of this run takes: `--length-passes` as given, or `auto`'s choice: 2 without CUDA where the
    micro-batch has 4 rows or more and is padded (not packed), else 1. On CUDA `auto` is 1: on an H100 2 passes
    ran 21% fewer tokens/s than one, a median step 40% longer (session 30, `docs/training.md`)."""
    asked = str(cfg.length_passes).lower()
    if asked != "auto":
        return int(asked)
    if cuda or cfg.packing or cfg.per_device_train_batch_size < AUTO_MIN_ROWS:
        return 1
    return AUTO_PASSES_WITHOUT_CUDA


def padded_to(width: int, multiple: int | None) -> int:
    """`width` rounded up to a multiple of `multiple` (--pad-to-multiple-of), or as it is without one."""
    return -(-width // multiple) * multiple if multiple else width


def pass_rows(rows: int, passes: int) -> set[int]:
    """The row counts a step's passes can have (`plan_passes` cuts `rows` rows into passes of ceil(rows / passes)),
    with `rows` itself for a batch that stays one pass: what a compiled block meets as its batch sizes."""
    if passes <= 1 or rows <= 1:
        return {rows}
    per = math.ceil(rows / passes)
    return {rows} | {min(per, rows - start) for start in range(0, rows, per)}


def plan_passes(batch: Mapping, passes: int, multiple: int | None = None) -> tuple[dict, list[tuple[int, int, int]] | str]:
    """The batch with its rows sorted by length (shortest first), and each pass's (first row, row after, width: its
    longest row, rounded up to `multiple` where the rows are padded to one); or the batch as it was and why it stays
    one pass."""
    import torch

    if passes <= 1:
        return batch, "one pass asked"
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor) or mask.dim() != 2:
        return batch, "no padding (padding-free or packed rows)"
    rows, width = mask.shape
    if rows < 2:
        return batch, "one row"
    lengths = mask.sum(dim=1)
    # right padding only: each row's real tokens first, then its padding. A left-padded row cut to a narrower width
    # would lose real tokens, and its positions would shift
    if not torch.equal(mask.bool(), torch.arange(width) < lengths[:, None]):
        return batch, "not right-padded"
    order = torch.argsort(lengths, stable=True)
    lengths = lengths[order].tolist()
    sorted_batch = {k: v.index_select(0, order) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
                    else v for k, v in batch.items()}
    per = math.ceil(rows / passes)
    plan = [(start, min(start + per, rows), max(1, min(width, padded_to(int(lengths[min(start + per, rows) - 1]), multiple))))
            for start in range(0, rows, per)]
    return sorted_batch, plan


class PlannedCollator:
    """The training loader's collator: the inner collator's batch, sorted and planned (module-level, so that a
    DataLoader worker process can take it)."""

    def __init__(self, collator, passes: int, multiple: int | None = None) -> None:
        self.collator, self.passes, self.multiple = collator, passes, multiple

    def __call__(self, features):
        batch, plan = plan_passes(self.collator(features), self.passes, self.multiple)
        batch = dict(batch)
        batch[PLAN] = plan
        return batch


def cut(batch: Mapping, start: int, stop: int, width: int) -> dict:
    """Rows start:stop of a planned batch, cut to `width` columns (only padding lies beyond it)."""
    import torch

    rows, full = batch["input_ids"].shape[:2]
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            value = value[start:stop]
            if value.dim() >= 2 and value.shape[1] == full:
                value = value[:, :width]
            value = value.contiguous()
        out[key] = value
    return out


def install(trainer, passes: int) -> dict[str, Any]:
    """Make `trainer` train each step's batch in up to `passes` passes by length; returns the record for run.json
    (micro-batches split, passes run, and the micro-batches left whole with why: a step of the defaults is one
    micro-batch), filled in as it trains."""
    record: dict[str, Any] = {"asked": passes, "batches_split": 0, "passes": 0, "one_pass": {}}
    if passes <= 1:
        return record
    make_loader = trainer.get_train_dataloader

    def get_train_dataloader(*args, **kwargs):
        collator = trainer.data_collator
        multiple = getattr(getattr(trainer, "args", None), "pad_to_multiple_of", None)  # the passes keep to the rows' widths
        trainer.data_collator = PlannedCollator(collator, passes, multiple)  # the Trainer reads it as it builds the loader
        try:
            return make_loader(*args, **kwargs)
        finally:
            trainer.data_collator = collator

    step = trainer.training_step

    def one_pass(why: str, model, inputs, num_items_in_batch, *args, **kwargs):
        record["one_pass"][why] = record["one_pass"].get(why, 0) + 1
        return step(model, inputs, num_items_in_batch, *args, **kwargs)

    def training_step(model, inputs, num_items_in_batch=None, *args, **kwargs):
        plan = inputs.pop(PLAN, "not planned") if isinstance(inputs, MutableMapping) else "not planned"
        if isinstance(plan, str):
            return one_pass(plan, model, inputs, num_items_in_batch, *args, **kwargs)
        if num_items_in_batch is None:  # each pass's loss would be its own mean, not its share of the step's
            return one_pass("no count of the step's target tokens", model, inputs, num_items_in_batch, *args, **kwargs)
        accelerator = getattr(trainer, "accelerator", None)
        total = None
        for i, (start, stop, width) in enumerate(plan):
            last = i == len(plan) - 1
            with contextlib.nullcontext() if last or accelerator is None else accelerator.no_sync(model):
                loss = step(model, cut(inputs, start, stop, width), num_items_in_batch, *args, **kwargs)
            total = loss if total is None else total + loss
        record["batches_split"] += 1
        record["passes"] += len(plan)
        return total

    trainer.get_train_dataloader = get_train_dataloader
    trainer.training_step = training_step
    return record


def padded_share(lengths: list[int], rows: int, passes: int, draws: int = 2000, seed: int = 0,
                 multiple: int | None = None) -> dict[str, float]:
    """Batches of `rows` drawn at random from `lengths`, as the Trainer shuffles, trained in `passes` passes by
    length, each pass padded to its longest row (rounded up to `multiple`, --pad-to-multiple-of): their real tokens,
    the tokens they compute padded, and the real share."""
    import random

    rng = random.Random(seed)
    real = padded = 0
    per = math.ceil(rows / max(1, passes))
    for _ in range(draws):
        batch = sorted(rng.choice(lengths) for _ in range(rows))
        real += sum(batch)
        widths = (batch[min(i + per, rows) - 1] for i in range(0, rows, per))
        padded += sum(len(batch[i:i + per]) * padded_to(w, multiple) for i, w in zip(range(0, rows, per), widths))
    return {"rows": rows, "passes": passes, "real_tokens": round(real / draws, 1),
            "padded_tokens": round(padded / draws, 1), "real_share": round(real / padded, 3)}
