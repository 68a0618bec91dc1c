"""One rank of the GAM agreement test, started by ``torchrun`` (fresh interpreters: no fork of a test process
whose thread pools or process groups a forked child would inherit half-made)::

    python -m torch.distributed.run --nproc_per_node 2 torchrun_gam.py OUT_DIR

Each rank trains a three-layer net under DDP on its own data, measures GAM every step, and writes its final weight
and per-epoch ratios to ``OUT_DIR/rank<r>.pt`` with the world size it ran in."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from distill.gam import GAM, GAMConfig


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    groups = {"backbone": list(net[0].parameters()), "aifi": list(net[1].parameters()),
              "decoder": list(net[2].parameters())}  # built from module objects before wrapping
    model = nn.parallel.DistributedDataParallel(net)
    # RT-DETRv4-S's band, as fractions
    gam = GAM(groups, GAMConfig(enabled=True, rule="paper", rho=0.11, delta=0.01, default_weight=20.0),
              initial_weight=5.0)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for epoch in range(3):
        for _ in range(4):
            model.zero_grad()
            model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
            gam.measure()
        gam.end_epoch(epoch, stop_epoch=10)
    torch.save({"world": world, "weight": gam.weight, "ratios": [h["ratio"] for h in gam.history]},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without running static destructors: on a loaded machine a rank whose work was all done and whose group
    # was destroyed still aborted at interpreter exit ("terminate called without an active exception", a joinable
    # thread left inside torch's DDP / gloo teardown: 2 runs in 20 on a loaded machine, 0 in 25 since this exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
