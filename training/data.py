"""Training data: load a hub dataset or a local file, check every row, standardise to chat messages.

Accepted rows: ShareGPT form (a `conversations` list of `{from, value}`, as FineTome-100k) or messages
form (a `messages` list of `{role, content}`). Anything else stops with an error naming the row.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shared.errors import ShallowError

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ShallowError):
    """The training data cannot be used as it is."""


def _messages(row: dict[str, Any], index: int) -> list[dict[str, str]]:
    if isinstance(row.get("conversations"), list):
        out = []
        for turn in row["conversations"]:
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
                raise DataError(
                    f"row {index}: each 'conversations' entry must be {{from: system|human|gpt, value: text}}, got {turn!r:.120}"
                )
            out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    elif isinstance(row.get("messages"), list):
        out = []
        for turn in row["messages"]:
            if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") or not isinstance(
                turn.get("content"), str
            ):
                raise DataError(
                    f"row {index}: each 'messages' entry must be {{role: system|user|assistant, content: text}}, got {turn!r:.120}"
                )
            out.append({"role": turn["role"], "content": turn["content"]})
    else:
        keys = sorted(k for k, v in row.items() if v is not None)
        raise DataError(
            f"row {index}: expected a 'conversations' list of {{from, value}} (ShareGPT, as FineTome-100k) "
            f"or a 'messages' list of {{role, content}}; this row has {keys}"
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"row {index}: the conversation has no assistant turn to learn from")
    return out


def load_conversations(source: str, *, split: str = "train", subset: int | None = None, seed: int = 3407):
    """A `datasets.Dataset` with one column, `messages`, from a hub id or a local .jsonl/.json/.parquet file.

    `subset` picks that many rows the same way every time (a seeded shuffle), as the lab's 1k studies did.
    """
    import datasets

    path = Path(source).expanduser()
    try:
        if path.suffix in LOCAL_FORMATS:
            if not path.is_file():
                raise DataError(f"The data file {path} does not exist.")
            ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        elif path.exists():
            raise DataError(f"{path} is not a .jsonl, .json or .parquet file.")
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds; the user needs the message
        raise DataError(f"Cannot load the data {source!r}: {exc.__class__.__name__}: {exc}") from None
    if len(ds) == 0:
        raise DataError(f"The data {source!r} has no rows.")
    if subset is not None:
        if subset < 1:
            raise DataError("--subset must be at least 1")
        ds = ds.shuffle(seed=seed).select(range(min(subset, len(ds))))
    # check every row before any training starts, naming the first bad one
    for index, row in enumerate(ds):
        _messages(row, index)
    ds = ds.map(lambda row, i: {"messages": _messages(row, i)}, with_indices=True, remove_columns=ds.column_names)
    logger.info("loaded %d conversations from %s", len(ds), source)
    return ds
