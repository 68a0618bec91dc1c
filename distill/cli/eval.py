"""``distill eval CONFIG --checkpoint X``: COCO metrics of a checkpoint on the config's validation set."""

from __future__ import annotations

import argparse
import json
import os


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config whose data section names the validation set (and whose "
                                       "model.student names the scale of a checkpoint that does not record it)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    parser.add_argument("--checkpoint", required=True,
                        help="best.pt / last.pt or a run directory, an official .pth, DEIMv2 safetensors, a saved "
                             "student or Hub directory, or a Hugging Face Hub model id (owner/name)")
    parser.add_argument("--out", help="metrics JSON (default: eval_<checkpoint>.json beside the checkpoint)")


def eval(args: argparse.Namespace) -> int:  # noqa: A001 (the command's name)
    import distill

    out = args.out or _default_out(args.checkpoint)
    metrics = distill.evaluate(args.checkpoint, args.config, args.overrides, out=out)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch every process evaluates a shard
        print(json.dumps(metrics))
        print(f"written: {out}")
    return 0


def _default_out(checkpoint: str) -> str:
    """eval_<name>.json beside a local checkpoint (``checkpoints/eval_best.json`` for a run directory); in the
    working directory for a Hub id, whose files live in the Hub cache."""
    from students.checkpoint import hub_id, resolve_source

    if hub_id(checkpoint) is not None:
        return f"eval_{hub_id(checkpoint)[0].replace('/', '_')}.json"
    source = str(resolve_source(checkpoint)).rstrip(os.sep)
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(os.path.dirname(source), f"eval_{stem}.json")
