"""The ``distill`` command: a thin dispatcher over the command modules.

Each entry of :data:`COMMANDS` maps a command path (one or two words) to the module that implements it.
A command module defines ``add_arguments(parser)`` and ``main(args) -> int``. Only the module of the
command being run is imported, so ``distill --help`` is instant and a broken module breaks only itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command words -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "zoo": ("students.zoo", "every student scale: params, GFLOPs and the official figures"),
    "train": ("distill.train_cmd", "train (and distil) a student from a YAML config"),
    "eval": ("distill.eval_cmd", "COCO metrics of a checkpoint"),
    "predict": ("distill.predict_cmd", "detections on images, as JSON and pictures"),
    "export": ("distill.export_cmd", "ONNX export of the deployed student"),
    "grid": ("distill.grid_cmd", "expand and run an ablation grid"),
    "collect": ("distill.collect_cmd", "tabulate and plot a finished grid"),
    "calibrate": ("distill.calibrate_cmd", "GAM rho/delta from a static-weight grid"),
    "data check": ("distill.data.check", "validate a COCO-format dataset"),
    "data synth": ("distill.data.synth", "write the embedded synthetic dataset"),
    "data show": ("distill.data.show", "picture of augmented training samples at an epoch"),
    "teacher show": ("teachers.show", "PCA picture of a teacher's patch features"),
    "viz pca": ("distill.viz_pca", "PCA feature panel (RT-DETRv4 Fig. 4)"),
    "viz curves": ("distill.viz_curves", "training curves of runs (RT-DETRv4 Fig. 5)"),
    "bench data": ("distill.data.bench", "training-pipeline images/s per stage and transform"),
    "bench step": ("distill.bench_step", "train-step time: plain, DSI, DSI+GAM"),
    "bench teacher": ("teachers.bench", "teacher images/s per input policy and precision"),
    "bench infer": ("distill.bench_infer", "inference latency, PyTorch and ONNX Runtime"),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    rows = "\n".join(f"  distill {k:<{width}}  {h}" for k, (_, h) in COMMANDS.items())
    return f"usage: distill COMMAND [options]   (distill COMMAND --help for its options)\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [w for w in argv[:2] if not w.startswith("-")]
    key = next((k for k in (" ".join(words[:2]), " ".join(words[:1])) if k in COMMANDS), None)
    if key is None:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage())
            return 0
        groups = sorted(k for k in COMMANDS if words and k.split()[0] == words[0])
        hint = f" Did you mean one of: {', '.join(groups)}?" if groups else ""
        print(f"distill: unknown command {' '.join(words) or argv[0]!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[key]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distill {key}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[len(key.split()) :])
    try:
        return int(module.main(args) or 0)
    except (OSError, ValueError, KeyError) as err:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        # bad input: one clear line naming the file, field or key at fault (DISTILL_DEBUG=1 for the traceback)
        print(f"distill {key}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
