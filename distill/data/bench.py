"""``distill bench data``: training-pipeline throughput of one worker, per stage and per transform.

    distill bench data CONFIG.yml            # the config's data: section
    distill bench data --data DIR [-n 64]    # a synth / COCO-layout directory

For each stage of the DataAug scheduler (warm-up, Mosaic, plain, no-aug; one epoch inside each) it runs
``n`` samples through decode + per-sample transforms + collate in this process (= one DataLoader worker) and
prints images/s, then the mean milliseconds per image of every transform (decode included).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from . import build_dataset
from .collate import Collator
from .config import DataConfig, load_data_config
from .transforms import STAGES, stage_of


def stage_epochs(cfg: DataConfig) -> dict[str, int]:
    """One epoch inside each stage that the policy has (an empty stage, e.g. e0 = 0, is left out)."""
    e0, e1, e2 = cfg.policy_epochs
    picks = {"warmup": e0 - 1, "mosaic": e0, "plain": e1, "noaug": e2}
    return {s: e for s, e in picks.items() if e >= 0 and stage_of(e, cfg.policy_epochs) == s}


def bench(cfg: DataConfig, n: int = 64, seed: int = 0) -> dict[str, dict[str, float]]:
    """{stage: {'images_per_s': .., 'ms/<op>': ..}} for ``n`` samples per stage."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    ds = build_dataset(cfg, "train")
    collate = Collator(cfg, train=True)
    tf = ds.transforms
    tf.profile = True
    tf.ops["mosaic"].warm(ds)
    out = {}
    for stage, epoch in stage_epochs(cfg).items():
        random.seed(seed)
        torch.manual_seed(seed)
        ds.set_epoch(epoch)
        collate.set_epoch(epoch)
        tf.timings.clear()
        t_decode = t_collate = 0.0
        t0 = time.perf_counter()
        batch = []
        for k in range(n):
            i = random.randrange(len(ds))
            t1 = time.perf_counter()
            image, target = ds.load_item(i)
            t_decode += time.perf_counter() - t1
            batch.append(tf(image, target, ds))
            if len(batch) == cfg.batch_size or k == n - 1:
                t1 = time.perf_counter()
                collate(batch)
                t_collate += time.perf_counter() - t1
                batch = []
        total = time.perf_counter() - t0
        row = {"epoch": float(epoch), "images_per_s": n / total, "ms/decode": 1e3 * t_decode / n}
        row.update({f"ms/{k}": 1e3 * v / n for k, v in tf.timings.items()})
        row["ms/collate"] = 1e3 * t_collate / n
        out[stage] = row
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML whose data: section is a DataConfig")
    parser.add_argument("--data", help="dataset directory (data synth / COCO layout)")
    parser.add_argument("-n", type=int, default=64, help="samples per stage")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--preset", default=None)


def main(args: argparse.Namespace) -> int:
    if not args.config and not args.data:
        raise SystemExit("distill bench data: give CONFIG or --data DIR")
    cfg = load_data_config(args.config, args.data, img_size=args.img_size, batch_size=args.batch_size,
                           preset=args.preset)
    res = bench(cfg, args.n)
    ops = sorted({k for r in res.values() for k in r if k.startswith("ms/")},
                 key=lambda k: ["ms/decode", "ms/mosaic", "ms/photometric", "ms/zoom_out", "ms/iou_crop",
                                "ms/sanitize", "ms/flip", "ms/resize", "ms/sanitize2", "ms/to_tensor",
                                "ms/collate"].index(k))
    print(f"training pipeline, one worker, img_size {cfg.img_size}, batch {cfg.batch_size}, {args.n} samples/stage")
    print(f"{'stage':8s} {'epoch':>5s} {'img/s':>7s} " + " ".join(f"{k[3:]:>11s}" for k in ops))
    for stage in STAGES:
        if stage in res:
            r = res[stage]
            cells = " ".join(f"{r[k]:11.2f}" if k in r else f"{'-':>11s}" for k in ops)
            print(f"{stage:8s} {int(r['epoch']):5d} {r['images_per_s']:7.1f} {cells}")
    print("(per-transform columns: mean ms per image; an op that a stage skips shows '-')")
    return 0
