"""Two CPU processes (gloo) train the same model through accelerate and stay in sync.

accelerate starts several CPU processes only through MPI; torchrun (which accelerate detects) needs none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_hmt

SCRIPT = Path(__file__).parent / "distributed_train.py"


def test_two_processes_stay_in_sync(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # each rank reads its own data
    start = {n: p for n, p in tiny_hmt("llama", seed=0).named_parameters()}
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, atol=0, rtol=0, msg=name)  # in sync
    assert any(not torch.equal(value, start[name].detach()) for name, value in ranks[0]["params"].items())
    assert (tmp_path / "checkpoints" / "step-0000004" / "rng-1.safetensors").is_file()


def test_a_nan_loss_on_one_process_stops_every_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(tmp_path), "nan-on-rank-1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert stopped[1].startswith("training stopped at step 2: the probe is nan")
    assert stopped[0].startswith("training stopped at step 2: the loss on another process is not finite")
