"""The Python API behind ``import distill`` (see the package docstring); each command of the same name is one of
these functions plus argument parsing and printing."""


from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["evaluate", "export", "load_train_config", "override_strings", "predict", "train"]


# ---------------------------------------------------------------------------------------------------------------
# Configs and overrides
# ---------------------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Keyword values as the YAML-safe types the config builder reads (paths as text, tuples as lists)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def override_strings(overrides: str | Sequence[str] | None = None, **options: Any) -> list[str]:
    """``overrides`` (one ``k=v`` string or a list) followed by ``options`` written as ``k.sub=value`` strings:
    ``schedule__epochs=2`` -> ``"schedule.epochs=2"``. The value is written as YAML, so it reads back exactly."""
    import yaml

    from .errors import UserError

    items = [overrides] if isinstance(overrides, str) else list(overrides or [])
    for key, value in options.items():
        parts = key.split("__")
        if not all(parts):
            raise UserError(f"override keyword {key!r}: use single words joined by '__' (schedule__epochs=2)")
        text = yaml.safe_dump(_plain(value), default_flow_style=True, width=2**31)
        text = text[: -len("...\n")] if text.endswith("\n...\n") else text  # a bare scalar's end-of-document
        items.append(f"{'.'.join(parts)}={text.strip()}")
    return items


def load_train_config(config: Any = None, overrides: str | Sequence[str] | None = None,
                      **options: Any) -> TrainConfig:
    """A validated :class:`~distill.config.TrainConfig` from a YAML path, a dict, a TrainConfig or None (the
    defaults), with ``overrides`` strings and ``options`` keywords applied (see :func:`override_strings`)."""
    from .config import TrainConfig
    from .yamlconf import apply_overrides, build, load_yaml, merge, read_config, to_dict

    strings = override_strings(overrides, **options)
    if config is None or isinstance(config, (str, os.PathLike)):
        return build(TrainConfig, read_config(config, strings))
    if isinstance(config, TrainConfig):
        data = to_dict(config)
    elif isinstance(config, Mapping):
        data = dict(config)
        includes = data.pop("include", None) or []
        base: dict = {}
        for path in [includes] if isinstance(includes, str) else includes:
            base = merge(base, load_yaml(path))
        data = merge(base, data)
    else:
        from .errors import UserError

        raise UserError(f"config must be a YAML path, a dict or a TrainConfig, not {type(config).__name__}")
    return build(TrainConfig, apply_overrides(data, strings))


# ---------------------------------------------------------------------------------------------------------------
# The four functions
# ---------------------------------------------------------------------------------------------------------------
def train(config: Any = None, overrides: str | Sequence[str] | None = None, *,
          resume: str | os.PathLike | None = None, **options: Any) -> dict[str, Any]:
    """Train (and distil) a student; returns the run's summary (``summary.json``: ``best_AP``, ``best_epoch``,
    ``wall_time_s``, ``params``, ...) plus ``run_dir``, ``checkpoint`` (its ``best.pt``, None before an evaluated
    epoch) and ``curves`` (the training-curves picture, None where it could not be drawn; ``curves_error`` says
    why). ``resume=RUN_DIR`` continues a stopped run from its ``last.pt`` with its own config (``config`` then
    stays None; the overrides still apply).

    >>> distill.train("experiments/quickstart.yaml", schedule__epochs=2, output_dir="runs/try")
    """
    from .engine import Trainer
    from .errors import UserError
    from .rundir import RunDir

    if resume is not None:
        if config is not None:
            raise UserError("give a config or resume=RUN_DIR, not both (a resumed run keeps its own config)")
        trainer = Trainer.resume(os.fspath(resume), override_strings(overrides, **options))
    else:
        trainer = Trainer(load_train_config(config, overrides, **options))
    summary = trainer.fit()
    run = RunDir(trainer.run_dir)
    result: dict[str, Any] = {**summary, "run_dir": str(run.path),
                              "checkpoint": str(run.best_path) if run.best_path.is_file() else None, "curves": None}
    if trainer.main:  # one process draws; the others return the same summary
        try:
            from . import viz

            path = run.path / "curves.png"
            viz.save(viz.plot_curves([viz.read_run(run.path)]), path)
            result["curves"] = str(path)
        except (OSError, ValueError) as err:  # a missing picture must not fail a finished run
            result["curves_error"] = str(err)
    return result


def evaluate(checkpoint: Any, config: Any = None, overrides: str | Sequence[str] | None = None, *,
             out: str | os.PathLike | None = None, **options: Any) -> dict[str, float]:
    """COCO box metrics (``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1`` ... ``ARl`` in [0, 1]) of
    ``checkpoint`` on the validation set of ``config`` (default: the config recorded in the checkpoint, e.g. a run
    directory's). The config also names the scale / classes a checkpoint does not record. ``out``: also write
    the metrics there as JSON.

    >>> distill.evaluate("runs/quickstart")["AP"]
    """
    from accelerate import Accelerator

    from students.checkpoint import read_weights
    from students.load import load_student

    from .data import build_dataloader, resolve_config
    from .data.synth import prepare_synth
    from .errors import UserError
    from .evaluator import build_evaluator
    from .evaluator import evaluate as coco_metrics

    weights = read_weights(checkpoint)
    if config is None:
        if not weights.config:
            raise UserError(f"{weights.source} records no training config: give config= (a YAML file whose data "
                            "section names the validation set)")
        config = weights.config
    cfg = load_train_config(config, overrides, **options)
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    data_cfg = resolve_config(prepare_synth(cfg.data))
    loader = build_dataloader(data_cfg, "val")
    # the config names what the checkpoint does not record; the anchors are those of the evaluation size
    student = load_student(weights, student=None if weights.student else cfg.model.student,
                           num_classes=None if weights.num_classes else cfg.model.num_classes or None,
                           input_size=(data_cfg.img_size, data_cfg.img_size), device=accelerator.device)
    metrics = coco_metrics(student, loader, build_evaluator(loader.dataset), accelerator.device)
    if out is not None and accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def predict(images: str | os.PathLike | Sequence[str | os.PathLike], checkpoint: Any, *, threshold: float = 0.3,
            device: str = "cpu", student: str | None = None, num_classes: int | None = None,
            out: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Detections of ``checkpoint`` on image files (a path, a directory of images, or a list of paths): one dict
    per image, ``{"image", "boxes": [[x0, y0, x1, y1], ...] (pixels of the original image), "labels", "names",
    "scores"}``, the detections scoring at least ``threshold``. ``student`` / ``num_classes`` name what an
    official checkpoint does not record. ``out``: also write ``predictions.json`` and one picture per image
    (``<stem>_pred.png``) into that directory.

    >>> distill.predict("photo.jpg", checkpoint="runs/quickstart")[0]["names"]
    """
    from students.checkpoint import read_weights
    from students.load import load_student

    from .detect import predict_images

    paths = _image_paths(images)
    weights = read_weights(checkpoint)
    model = load_student(weights, student=student, num_classes=num_classes, device=device)
    names = weights.label_names()
    records = predict_images(model, paths, names, threshold)
    if out is not None:
        from .viz.detections import draw_detections

        os.makedirs(out, exist_ok=True)
        for record in records:
            stem = os.path.splitext(os.path.basename(record["image"]))[0]
            draw_detections(record["image"], record, names, os.path.join(out, f"{stem}_pred.png"))
        with open(os.path.join(out, "predictions.json"), "w") as f:
            json.dump(records, f, indent=1)
    return records


def export(checkpoint: Any, out: str | os.PathLike = "model.onnx", *, config: Any = None, student: str | None = None,
           num_classes: int | None = None, input_size: tuple[int, int] | None = None, dynamic_batch: bool = False,
           opset: int = 17, orig_target_sizes: bool = False, verify: bool = True, **options: Any) -> dict[str, Any]:
    """ONNX file of the deployed student of ``checkpoint`` (see :mod:`distill.onnx_export`); returns what was written:
    ``{"out", "student", "num_classes", "epoch", "input_size", "inputs", "outputs", "dynamic_batch", "opset",
    "onnx_weights", "size_mb", "ok"}`` plus ``max_abs_diff`` per batch size when ``verify`` (ONNX Runtime against
    PyTorch on random images; ``ok`` False when they differ beyond 1e-4). ``config`` (optional) must agree with the
    checkpoint; ``input_size`` defaults to the scale's deployment size. ``options`` go to
    :func:`distill.onnx_export.export_onnx`.

    >>> distill.export("runs/quickstart", "atto.onnx", dynamic_batch=True)["ok"]
    """
    from students.checkpoint import read_weights
    from students.load import load_student
    from students.registry import STUDENTS

    from .errors import UserError
    from .onnx_export import export_ok, export_onnx, onnx_initializers, verify_export

    out = os.fspath(out)
    if config is not None:
        cfg = load_train_config(config)
        if student and student != cfg.model.student:
            raise UserError(f"student {student!r} but the config says model.student={cfg.model.student}")
        student = cfg.model.student
        num_classes = num_classes or (cfg.model.num_classes or None)
    weights = read_weights(checkpoint)
    name = weights.student or student
    size = tuple(input_size) if input_size else None
    if size is None and name in STUDENTS:  # the scale's deployment size, not the training size the file records
        size = STUDENTS[name].input_size
    model_in = load_student(weights, student=student, num_classes=num_classes, input_size=size)
    model = export_onnx(model_in, out, dynamic_batch=dynamic_batch, opset=opset, orig_sizes=orig_target_sizes,
                        **options)
    summary: dict[str, Any] = {
        "out": out,
        "student": model_in.name,
        "num_classes": model_in.num_classes,
        "epoch": weights.epoch,
        "input_size": list(model.input_size),
        "inputs": ["images"] + (["orig_target_sizes"] if orig_target_sizes else []),
        "outputs": ["labels", "boxes", "scores"],
        "dynamic_batch": dynamic_batch,
        "opset": opset,
        "onnx_weights": int(sum(a.size for a in onnx_initializers(out).values() if a.dtype.kind == "f")),
        "size_mb": round(os.path.getsize(out) / 2**20, 2),
        "ok": True,
    }
    if verify:
        diffs = verify_export(model, out, batches=(1, 3) if dynamic_batch else (1,))
        summary["max_abs_diff"] = {str(b): d for b, d in diffs.items()}
        summary["ok"] = all(export_ok(d) for d in diffs.values())
    return summary


def _image_paths(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    from .data.layout import is_image
    from .errors import UserError

    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    paths: list[str] = []
    for item in map(os.fspath, items):
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item) if is_image(n))
        else:
            paths.append(item)
    if not paths:
        raise UserError(f"no images in {images!r}")
    return paths
