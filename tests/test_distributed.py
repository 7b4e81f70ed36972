"""torchrun with 2 CPU processes writes the run one process writes, and certifies it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phpn.cli import main
from phpn.runs.store import load_run

ROOT = Path(__file__).resolve().parents[1]
# 0 MB: one class per group, so both ranks get groups; few images keep it quick.
ARGS = ["discover", "--demo", "fashion-mnist", "--images-per-class", "3", "--memory-budget", "0",
        "--device", "cpu", "--workers", "0", "--quiet", "--json"]


@pytest.mark.slow
def test_two_torchrun_processes_give_the_single_process_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "phpn", *ARGS, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports and writes
    report = json.loads(lines[0])
    assert report["certificate"]["passed"] and report["certificate"]["images"] == 30

    # The reference: one process, at the thread count each rank had (torchrun sets 1 thread),
    # since float sums can round differently with more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = load_run(tmp_path / "one"), load_run(tmp_path / "two")
    assert one.meta["ranks"] == 1 and two.meta["ranks"] == 2 and two.meta["groups"] == 10
    assert torch.equal(one.class_indices, two.class_indices)
    for name in ("prototypes", "nmf_prototypes", "alpha"):
        assert float((getattr(one, name).double() - getattr(two, name).double()).abs().max()) <= 1e-5, name
    assert one.meta["certificate"]["agreed"] == two.meta["certificate"]["agreed"] == 30
    assert not (tmp_path / ".two.progress").exists()  # finished: the progress folder is gone
