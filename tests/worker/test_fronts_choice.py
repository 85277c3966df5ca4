"""How many front processes a worker runs: `--fronts N` as given, or auto (worker.main.resolve_fronts), and
how the slots are shared out among them (worker.remote.share_slots)."""
from __future__ import annotations

import dataclasses

import pytest

from shared.errors import ConfigError
from shared.settings import Settings
from worker.main import resolve_fronts
from worker.remote import share_slots


@pytest.mark.parametrize("slots, fronts, shares", [
    (5, 2, [3, 2]), (8, 3, [3, 3, 2]), (256, 16, [16] * 16), (2, 4, [1, 1]), (1, 1, [1]), (7, 1, [7]),
])
def test_every_slot_is_given_to_exactly_one_front(slots, fronts, shares):
    assert share_slots(slots, fronts) == shares
    assert sum(share_slots(slots, fronts)) == slots


def settings(**kw) -> Settings:
    base = dict(backend="batched", batch_engine="slots", slots=256, fronts=None, device="auto")
    return dataclasses.replace(Settings.from_env(), **{**base, **kw})


@pytest.fixture
def cuda_box(monkeypatch):
    """A CUDA box with 16 CPUs for this process, as far as the choice goes (torch's own answers replaced)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("SHALLOW_MODEL_PROCESSES", raising=False)


def test_given_fronts_are_kept_and_a_wrong_backend_is_refused():
    assert resolve_fronts(settings(fronts=4)) == 4
    assert resolve_fronts(settings(fronts=0)) == 0
    with pytest.raises(ConfigError, match="needs SHALLOW_BACKEND=batched"):
        resolve_fronts(settings(fronts=2, backend="transformers"))
    with pytest.raises(ConfigError, match="needs SHALLOW_BACKEND=batched"):
        resolve_fronts(settings(fronts=2, batch_engine="paged"))


def test_auto_is_one_front_per_16_slots_on_cuda_within_the_cpus(cuda_box, monkeypatch):
    assert resolve_fronts(settings(slots=256)) == 16
    assert resolve_fronts(settings(slots=64)) == 4
    assert resolve_fronts(settings(slots=1024)) == 16  # no more fronts than CPUs
    monkeypatch.setenv("SHALLOW_MODEL_PROCESSES", "2")  # `--processes 2`: two model processes share the CPUs
    assert resolve_fronts(settings(slots=256)) == 8


@pytest.mark.parametrize("kw", [
    dict(slots=16),  # too few slots to share
    dict(slots=31),
    dict(device="cpu"),
    dict(backend="transformers"),
    dict(batch_engine="paged"),
])
def test_auto_keeps_one_process_where_fronts_do_not_pay(cuda_box, kw):
    assert resolve_fronts(settings(**kw)) == 0


def test_auto_without_cuda_is_one_process():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this box has CUDA")
    assert resolve_fronts(settings(slots=256)) == 0


def test_shallow_fronts_reads_a_number_or_auto(monkeypatch):
    monkeypatch.delenv("SHALLOW_FRONTS", raising=False)
    assert Settings.from_env().fronts is None
    for raw, want in (("auto", None), ("AUTO", None), ("0", 0), ("6", 6)):
        monkeypatch.setenv("SHALLOW_FRONTS", raw)
        assert Settings.from_env().fronts == want
    for raw in ("two", "-1", "1.5"):
        monkeypatch.setenv("SHALLOW_FRONTS", raw)
        with pytest.raises(ConfigError, match="SHALLOW_FRONTS must be"):
            Settings.from_env()
