"""Run by test_distributed.py under `accelerate launch --cpu --num_processes 2`: a few steps of DDP training."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_ids, tiny_hmt
from hmt.data import RandomWindows
from hmt.train import TrainConfig, train

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
train(model, source, config, run_dir, accelerator=accelerator)
params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
torch.save({"params": params, "first_batch": first}, run_dir / f"rank-{accelerator.process_index}.pt")
