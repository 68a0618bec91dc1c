"""One rank of a training started by ``torchrun`` in the multi-process tests, with checks made inside the run.

    python -m torch.distributed.run --nproc_per_node 2 torchrun_train.py OUT_DIR train CONFIG [k=v ...]
    python -m torch.distributed.run --nproc_per_node 2 torchrun_train.py OUT_DIR resume RUN_DIR

Writes ``OUT_DIR/rank<r>.json`` after the run ended normally: the rank, the world size, the process id, the number
of boxes of each of the rank's training batches (as the criterion saw them), and for each evaluation the image ids
this rank evaluated and the ids gathered from all ranks."""

import json
import os
import sys

import torch.distributed as dist

from distill.config import load_config
from distill.engine import Trainer


def main() -> None:
    out, mode, where, *overrides = sys.argv[1:]
    trainer = Trainer.resume(where, overrides) if mode == "resume" else Trainer(load_config(where, overrides))
    assert dist.is_available() and dist.is_initialized(), "the run is not distributed"
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and trainer.accelerator.num_processes == 2, (world, trainer.accelerator.num_processes)
    assert trainer.accelerator.process_index == rank

    boxes: list[int] = []
    criterion = trainer.step.criterion

    def counting(outputs, targets, epoch=0):
        boxes.append(sum(len(t["labels"]) for t in targets))
        return criterion(outputs, targets, epoch=epoch)

    evaluations: list[dict] = []
    gather = trainer.evaluator.gather

    def recording_gather():
        mine = sorted(trainer.evaluator.results)
        everyone = gather()
        evaluations.append({"mine": mine, "gathered": sorted(everyone)})
        return everyone

    trainer.step.criterion = counting
    trainer.evaluator.gather = recording_gather
    trainer.fit()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "pid": os.getpid(), "boxes_per_step": boxes,
                   "evaluations": evaluations}, f)  # fmt: skip


if __name__ == "__main__":
    main()
