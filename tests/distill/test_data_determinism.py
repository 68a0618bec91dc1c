"""An epoch's batches are a function of (seed, epoch): the property exact resume rests on."""

import torch

from distill.data import build_dataloader, config_from_dict, resolve_config
from distill.data.synth import make_synth


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(images.clone(), [int(t["image_id"]) for t in targets], [t["boxes"].clone() for t in targets])
            for images, targets in loader]  # fmt: skip


def test_same_epoch_same_batches_with_persistent_workers_and_after_a_restart(tmp_path):
    make_synth(str(tmp_path), train=8, val=2, size=64, seed=1)
    cfg = resolve_config(config_from_dict({
        "synth": str(tmp_path), "img_size": 64, "batch_size": 2, "num_workers": 2, "seed": 3,
        "policy_epochs": [0, 2, 4], "stop_epoch": 4, "base_size_repeat": 1,
        "mosaic": {"prob": 0.5, "output_size": 32, "use_cache": True}, "mixup": {"prob": 0.5, "epochs": [0, 4]},
    }))  # fmt: skip
    long_lived = build_dataloader(cfg, "train")
    history = [_batches(long_lived, e) for e in range(3)]  # workers persist across these epochs
    fresh = build_dataloader(cfg, "train")  # as after a resume: new workers, first epoch is 2
    replay = _batches(fresh, 2)
    assert [ids for _, ids, _ in replay] == [ids for _, ids, _ in history[2]]
    for (a, _, boxes_a), (b, _, boxes_b) in zip(history[2], replay):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for x, y in zip(boxes_a, boxes_b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert [ids for _, ids, _ in history[1]] != [ids for _, ids, _ in history[2]]  # epochs do differ
