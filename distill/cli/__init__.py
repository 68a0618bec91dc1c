"""The ``distill`` command: a dispatcher over one module per command group.

:data:`COMMANDS` maps a command path (one or two words) to ``(module, name, help)``. The module defines
``<name>_arguments(parser: argparse.ArgumentParser) -> None`` and ``<name>(args: argparse.Namespace) -> int``.
Only the module of the command being run is imported, so ``distill --help`` is instant and a broken module
breaks only its own commands.

This package is the only place that parses arguments or prints for the user; the libraries below it raise
:class:`distill.errors.UserError` for bad input, which is printed here as one line. Any other exception is a
bug of the project and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

# command words -> (module, function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "zoo": ("distill.cli.zoo", "zoo", "every student scale: params, GFLOPs and the official figures"),
    "train": ("distill.cli.train", "train", "train (and distil) a student from a YAML config"),
    "eval": ("distill.cli.eval", "eval", "COCO metrics of a checkpoint"),
    "predict": ("distill.cli.predict", "predict", "detections on images, as JSON and pictures"),
    "export": ("distill.cli.export", "export", "ONNX export of the deployed student"),
    "push": ("distill.cli.push", "push", "a trained student to the Hugging Face Hub (model card included)"),
    "quickstart": ("distill.cli.quickstart", "quickstart", "the main job: distillation end to end, plain vs distilled"),
    "grid": ("distill.cli.grid", "grid", "expand and run an ablation grid"),
    "collect": ("distill.cli.collect", "collect", "tabulate and plot a finished grid"),
    "calibrate": ("distill.cli.calibrate", "calibrate", "GAM rho/delta from a static-weight grid"),
    "data check": ("distill.cli.data", "check", "validate a COCO- or YOLO-format dataset"),
    "data convert": ("distill.cli.data", "convert", "convert a dataset between the COCO and YOLO formats"),
    "data synth": ("distill.cli.data", "synth", "write the embedded synthetic dataset"),
    "data show": ("distill.cli.data", "show", "picture of augmented training samples at an epoch"),
    "teacher show": ("distill.cli.teacher", "show", "PCA picture of a teacher's patch features"),
    "pretrain": ("distill.cli.pretrain", "pretrain", "train a small transformers ViT teacher (labels or MAE)"),
    "viz pca": ("distill.cli.viz", "pca", "PCA feature panel (RT-DETRv4 Fig. 4)"),
    "viz curves": ("distill.cli.viz", "curves", "training curves of runs (RT-DETRv4 Fig. 5)"),
    "bench data": ("distill.cli.bench", "data", "training-pipeline images/s per stage and transform"),
    "bench step": ("distill.cli.bench", "step", "train-step time: plain, DSI, DSI+GAM"),
    "bench teacher": ("distill.cli.bench", "teacher", "teacher images/s per input policy and precision"),
    "bench infer": ("distill.cli.bench", "infer", "inference latency, PyTorch and ONNX Runtime"),
    "parity": ("distill.cli.parity", "parity", "a student beside the official DEIM / DEIMv2 / RT-DETRv4 code"),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    rows = "\n".join(f"  distill {k:<{width}}  {h}" for k, (_, _, h) in COMMANDS.items())
    return f"usage: distill COMMAND [options]   (distill COMMAND --help for its options)\n\ncommands:\n{rows}\n"


def _command(argv: list[str]) -> str | None:
    """The longest command path that ``argv`` starts with (options may not come before the command words)."""
    words = [w for w in argv[:2] if not w.startswith("-")]
    return next((k for k in (" ".join(words[:2]), " ".join(words[:1])) if k in COMMANDS), None)


def parser_for(key: str) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]:
    """The parser of command ``key`` and the function that runs it (imports only that command's module)."""
    module_name, name, help_text = COMMANDS[key]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distill {key}", description=help_text)
    getattr(module, f"{name}_arguments")(parser)
    return parser, getattr(module, name)


def main(argv: list[str] | None = None) -> int:
    """Run one ``distill`` command; returns its exit status (2 for a usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    key = _command(argv)
    if key is None:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage())
            return 0
        words = [w for w in argv[:2] if not w.startswith("-")]
        groups = sorted(k for k in COMMANDS if words and k.split()[0] == words[0])
        hint = f" Did you mean one of: {', '.join(groups)}?" if groups else ""
        print(f"distill: unknown command {' '.join(words) or argv[0]!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    parser, run = parser_for(key)
    args = parser.parse_args(argv[len(key.split()) :])
    # imported here, not at the top, so that `distill --help` imports nothing of the project
    from distill.errors import UserError

    try:
        return int(run(args) or 0)
    except UserError as err:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        # bad input: one line naming the file, field or key at fault (DISTILL_DEBUG=1 for the traceback).
        # Anything else is a bug of ours and propagates with its traceback.
        print(f"distill {key}: error: {err}", file=sys.stderr)
        return 2
