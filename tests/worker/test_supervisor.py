from __future__ import annotations

from worker.supervisor import plan


def test_one_worker_per_gpu_or_n_spread_over_them():
    assert plan(None, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0", "SHALLOW_MODEL_PROCESSES": "2"},
                                      {"CUDA_VISIBLE_DEVICES": "1", "SHALLOW_MODEL_PROCESSES": "2"}]
    assert plan(4, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": g, "SHALLOW_MODEL_PROCESSES": "4"} for g in ("0", "1", "0", "1")]
    assert plan(3, []) == [{"SHALLOW_MODEL_PROCESSES": "3"}] * 3
