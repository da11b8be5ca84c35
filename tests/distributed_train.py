"""Run by test_distributed.py under `accelerate launch --cpu --num_processes 2`: a few steps of DDP training."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_ids, tiny_hmt
from hmt.data import RandomWindows
from hmt.train import TrainConfig, TrainingDiverged, train

run_dir = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
model = tiny_hmt("llama", seed=0)  # identical start on every rank
model.backbone.requires_grad_(True)
source = RandomWindows(
    random_ids(1, 2000)[0], 2, seed=0, rank=accelerator.process_index, world=accelerator.num_processes
)
first = source.batch(0, 16).input_ids
config = TrainConfig(
    mode="hmt", unroll="2", max_steps=4, log_every=2, eval_every=0, save_every=2, batch_size=2
)
if sys.argv[2:] == ["nan-on-rank-1"]:  # every rank must stop, not wait for the one that stopped

    def nan_on_rank_1(model, batch, labels, out, calls=[]):  # noqa: B006 (counts the calls)
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == 2 and accelerator.process_index == 1 else 0.0)

    nan_on_rank_1.name, nan_on_rank_1.weight, nan_on_rank_1.needs_logits = "probe", 1.0, False
    try:
        train(model, source, config, run_dir, accelerator=accelerator, auxiliary=nan_on_rank_1)
    except TrainingDiverged as err:
        (run_dir / f"rank-{accelerator.process_index}.txt").write_text(str(err))
    sys.exit(0)
train(model, source, config, run_dir, accelerator=accelerator)
params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
torch.save({"params": params, "first_batch": first}, run_dir / f"rank-{accelerator.process_index}.pt")
