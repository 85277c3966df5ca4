"""`shallow sweep`: the lab's hyperparameter study, one setting changed at a time from the recipe.

Each run is an ordinary `shallow train` run in its own folder (so each resumes like any other, and a
finished one is not run again). Writes one PNG per hyperparameter (average training loss per epoch, and
eval loss, one line per value) and a markdown table of the results.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from shared.errors import ConfigError
from training.train import TrainConfig, epoch_losses, parse_config, train

logger = logging.getLogger(__name__)

# The lab's study: the values tried for each hyperparameter (the recipe's own value is the baseline run).
STUDY: dict[str, list] = {
    "num_train_epochs": [],  # the baseline's loss per epoch is the epochs study
    "learning_rate": [1e-4, 2e-4, 4e-4],
    "lr_scheduler_type": ["linear", "cosine"],
    "weight_decay": [0.005, 0.01, 0.02],
    "per_device_train_batch_size": [2, 4],
}


@dataclass
class SweepConfig(TrainConfig):
    """The recipe (every `shallow train` setting), plus which hyperparameters to study."""

    output_dir: str = field(default="runs/sweep", metadata={"help": "one folder per run, plus the plots and table"})
    subset: int | None = field(default=1000, metadata={"help": "examples per run (the lab's 1k studies)"})
    only: str = field(default="", metadata={"help": "comma-separated hyperparameters to study (default: all)"})


def studied(cfg: SweepConfig) -> list[str]:
    names = [n.strip() for n in cfg.only.split(",") if n.strip()] or list(STUDY)
    unknown = [n for n in names if n not in STUDY]
    if unknown:
        raise ConfigError(f"--only: unknown hyperparameters {unknown}; the study has {list(STUDY)}")
    return names


def plan(cfg: SweepConfig) -> list[tuple[str, str | None, TrainConfig]]:
    """(run name, hyperparameter or None for the baseline, its config) for every run of the study."""
    names = studied(cfg)
    base_fields = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    baseline = TrainConfig(**base_fields)
    out = Path(cfg.output_dir)
    runs = [("baseline", None, replace(baseline, output_dir=str(out / "baseline")))]
    for name in names:
        for value in STUDY[name]:
            if value == getattr(baseline, name):
                continue  # that is the baseline run
            run = f"{name}={value}"
            runs.append((run, name, replace(baseline, **{name: value}, output_dir=str(out / run))))
    return runs


def run_sweep(cfg: SweepConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    runs = plan(cfg)
    for i, (name, _, run_cfg) in enumerate(runs, 1):
        record_path = Path(run_cfg.output_dir) / "run.json"
        if record_path.exists():
            logger.info("[%d/%d] %s: finished before, not run again", i, len(runs), name)
            results[name] = json.loads(record_path.read_text())
            continue
        logger.info("[%d/%d] %s", i, len(runs), name)
        results[name] = train(run_cfg)
    for param in studied(cfg):
        members = [("baseline", getattr(cfg, param))] + [(n, getattr(c, param)) for n, p, c in runs if p == param]
        plot_param(param, members, out)
    table = write_table(runs, results, out / "results.md")
    print(f"shallow sweep: {len(runs)} runs; table {table}; plots {out}/*.png", flush=True)
    return table


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def plot_param(param: str, members: list[tuple[str, object]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run, value in members:
        train_loss, eval_loss = epoch_losses(_history(out / run))
        label = f"{param}={value}" + (" (recipe)" if run == "baseline" else "")
        line = ax.plot(list(train_loss), list(train_loss.values()), marker="o", label=label)[0]
        if eval_loss:
            ax.plot(list(eval_loss), list(eval_loss.values()), marker="s", linestyle="--", color=line.get_color(),
                    label=f"{label}, eval")
    ax.set_xlabel("epoch")
    ax.set_ylabel("average training loss")
    ax.set_title(f"{param}: one change from the recipe")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{param}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_table(runs, results: dict[str, dict], path: Path) -> Path:
    lines = [
        "| run | changed | final train loss | best eval loss | steps | tokens/s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, param, run_cfg in runs:
        train_loss, _ = epoch_losses(_history(Path(run_cfg.output_dir)))
        rec = results[name]
        last = f"{list(train_loss.values())[-1]:.4f}" if train_loss else "-"
        best = f"{rec['best_eval_loss']:.4f}" if rec.get("best_eval_loss") is not None else "-"
        lines.append(f"| {name} | {param or '(recipe)'} | {last} | {best} | {rec['global_step']} | "
                     f"{rec.get('tokens_per_second') or '-'} | {rec.get('wall_seconds', '-')} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    run_sweep(parse_config(argv, SweepConfig, "shallow sweep"))
    return 0
