"""bench/enqueue_cost.py against a real redis-server of its own: every turn it sends, alone or in a burst, is queued."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_enqueue_cost_sends_every_turn_and_reports_each_burst(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.enqueue_cost", "--turns", "30", "--burst", "4,8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, SHALLOW_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    per_turn = re.search(r"one at a time, 30 turns: ([\d.]+) ms wall, ([\d.]+) ms of client CPU and ([\d.]+) Redis commands", out)
    assert per_turn and float(per_turn.group(1)) > 0 and float(per_turn.group(3)) >= 5, out
    for size in (4, 8):
        first = re.search(rf"burst of {size} \(first, (\d+) new connections\): enqueued after p50 [\d.]+ ms", out)
        again = re.search(rf"burst of {size} \(again, (\d+) new connections\): enqueued after p50 [\d.]+ ms", out)
        assert first and again, out
    assert "74 jobs in the queue, of 74 sent" in out  # 20 warm-up + 30 + 2 x (4 + 8): none lost


def test_enqueue_cost_as_the_bots_send_queues_every_turn_of_each_burst(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.enqueue_cost", "--turns", "10", "--burst", "4,8", "--bots", "--threads", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, SHALLOW_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for size in (4, 8):
        for when in ("first", "again"):
            line = re.search(rf"burst of {size} \({when}, \d+ new connections\): enqueued after p50 ([\d.]+) ms, p95 ([\d.]+) ms", out)
            assert line and 0 < float(line.group(1)) <= float(line.group(2)), out
    assert "54 jobs in the queue, of 54 sent" in out  # 20 warm-up + 10 + 2 x (4 + 8), each burst through the bots' submit
