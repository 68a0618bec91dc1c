"""A trained student as a Hugging Face Hub model: the directory (:func:`save_hub_dir`) and its upload
(:func:`push_to_hub`, ``distill push RUN_DIR REPO_ID``).

The directory::

    model.safetensors   the student's weights (the run's best EMA weights, not deployed: it fine-tunes too)
    config.json         what students.checkpoint.read_weights reads: scale name, num_classes, class names, input
                        size; plus the framework's name and version
    README.md           the model card: YAML front matter (library_name, pipeline_tag, tags, datasets and a
                        model-index where the dataset is named) and the student, teacher, data, metrics and how to
                        load it

Every reader of weights accepts that directory and its Hub id (``owner/name``; the reader downloads it with
``huggingface_hub.snapshot_download``): ``build_student(pretrained=...)``, ``model.pretrained`` in a config,
``distill eval / predict / export --checkpoint``, and :mod:`distill`'s Python API.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from students.checkpoint import CONFIG_NAME, WEIGHTS_NAME, Weights, hub_id, read_weights

from .errors import UserError
from .rundir import RunDir, teacher_of

__all__ = ["CARD_NAME", "FRAMEWORK", "framework_version", "model_card", "push_to_hub", "save_hub_dir"]

FRAMEWORK = "rtdistill"  # the distribution name (pyproject), also the Hub's library_name
CARD_NAME = "README.md"
# COCO metrics shown in the card, with the words the Hub's model-index uses for them
_CARD_METRICS = {"AP": "AP (IoU 0.50:0.95)", "AP50": "AP50", "AP75": "AP75", "APs": "AP small", "APm": "AP medium",
                 "APl": "AP large", "AR100": "AR (100 detections)"}  # fmt: skip
_PLACEHOLDER_ID = "OWNER/MODEL"


def framework_version() -> str:
    try:
        return importlib.metadata.version(FRAMEWORK)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def save_hub_dir(source: str | os.PathLike | Weights, out_dir: str | os.PathLike, *, repo_id: str | None = None,
                 dataset: str | None = None, license: str | None = None) -> Path:  # noqa: A002 (the Hub's key)
    """Write the Hub-ready directory of a trained student into ``out_dir`` (created; files there are replaced).

    ``source``: a run directory (its ``checkpoints/best.pt``), a checkpoint written by ``distill train``, or any
    weights :func:`students.checkpoint.read_weights` takes that record their scale. ``repo_id`` only fills the
    loading examples of the card; ``dataset`` (a Hub dataset id) and ``license`` go into its front matter.
    Returns ``out_dir``.
    """
    from students import save_student
    from students.load import load_student

    weights = read_weights(source)
    if not weights.student:
        raise UserError(f"{weights.source} does not record which student it holds; load it with the scale named "
                        "(students.load.load_student(..., student=NAME)) and save_student() it first")
    # the source's own input size (the training size for a run) and classes; loading it also proves it loads
    student = load_student(weights)
    out = Path(out_dir)
    save_student(student, out)
    config = json.loads((out / CONFIG_NAME).read_text())
    config["class_names"] = [str(n) for n in weights.label_names().values()]
    config["framework"] = {"name": FRAMEWORK, "version": framework_version()}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    run = RunDir.containing(weights.source) if os.path.exists(weights.source) else None
    summary = run.summary() if run is not None else {}
    card = model_card(weights, config, summary=summary, repo_id=repo_id, dataset=dataset, license=license)
    (out / CARD_NAME).write_text(card)
    return out


def push_to_hub(source: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                dataset: str | None = None, license: str | None = None,  # noqa: A002 (the Hub's key)
                commit_message: str | None = None, keep_dir: str | os.PathLike | None = None,
                api: Any = None) -> dict[str, Any]:
    """Build the Hub directory of ``source`` (see :func:`save_hub_dir`) and upload it to the model repository
    ``repo_id`` (created if missing, ``private`` then) with ``huggingface_hub.HfApi``.

    The directory is built in a temporary folder, or in ``keep_dir`` (kept) when given. ``api`` replaces
    ``HfApi(token=token)`` (anything with its ``create_repo`` and ``upload_folder``). Returns ``{"repo_id",
    "url", "commit_url", "files"}``. The Hub's refusals (no token, no write access) are :class:`UserError`.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if hub_id(f"hf://{repo_id}") is None or "@" in repo_id:
        raise UserError(f"{repo_id!r} is not a Hub model id (owner/name)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="rtdistill_hub_") as tmp:
        folder = Path(keep_dir) if keep_dir is not None else Path(tmp)
        save_hub_dir(source, folder, repo_id=repo_id, dataset=dataset, license=license)
        files = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]  # only these, whatever else keep_dir holds
        message = commit_message or f"Upload {json.loads((folder / CONFIG_NAME).read_text())['name']} ({FRAMEWORK})"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                       commit_message=message, allow_patterns=files)
        except (HfHubHTTPError, LocalTokenNotFoundError) as err:
            raise UserError(f"the Hub refused the upload to {repo_id}: {str(err).splitlines()[0]} (log in with "
                            "`hf auth login` or set HF_TOKEN to a token with write access)") from err
    return {"repo_id": repo_id, "url": str(url), "commit_url": getattr(commit, "commit_url", None), "files": files}


# ---------------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------------
def model_card(weights: Weights, config: Mapping[str, Any], *, summary: Mapping[str, Any] | None = None,
               repo_id: str | None = None, dataset: str | None = None,
               license: str | None = None) -> str:  # noqa: A002 (the Hub's key)
    """The ``README.md`` of a Hub directory: front matter through ``huggingface_hub.ModelCardData``, then the
    student, teacher, data, metrics and how to load it. ``config`` is the directory's ``config.json``."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    from students.registry import STUDENTS

    name = str(config["name"])
    train_cfg = weights.config
    metrics = {k: v for k, v in (weights.meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    teacher = _teacher(train_cfg)
    family = STUDENTS[name].family if name in STUDENTS else None
    tags = [FRAMEWORK, "object-detection", "detr", "real-time", *([family] if family else [])]
    if teacher:
        tags.append("knowledge-distillation")
    title = f"{name} ({FRAMEWORK})"
    eval_results = None
    if dataset and "AP" in metrics:
        eval_results = [EvalResult(task_type="object-detection", dataset_type=dataset, dataset_name=dataset,
                                   metric_type=key.lower(), metric_value=round(float(metrics[key]), 4),
                                   metric_name=_CARD_METRICS[key])
                        for key in ("AP", "AP50", "AP75") if key in metrics]  # fmt: skip
    pretrained = str((train_cfg.get("model") or {}).get("pretrained") or "")
    base = hub_id(pretrained) if pretrained and not pretrained.startswith(("/", ".")) else None
    data = ModelCardData(
        library_name=FRAMEWORK,
        pipeline_tag="object-detection",
        license=license,
        tags=tags,
        datasets=[dataset] if dataset else None,
        base_model=base[0] if base else None,
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )
    body = _card_body(weights, config, train_cfg, metrics, summary or {}, teacher, repo_id or _PLACEHOLDER_ID,
                      dataset, title)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _teacher(train_cfg: Mapping[str, Any]) -> str:
    """The teacher of a distillation run in words ('' for a plain run or a config this version cannot read)."""
    distill = train_cfg.get("distill")
    if not distill:
        return ""
    try:
        found = teacher_of(distill)
    except UserError:
        return "a teacher (its configuration is from another version of the framework)"
    if found is None:
        return ""
    spec, layer = found
    what = spec.get("preset") or spec.get("name") or "teacher"
    if spec.get("checkpoint") or spec.get("weights"):
        path = os.path.basename(os.path.normpath(str(spec.get("checkpoint") or spec.get("weights"))))
        what = f"{what} (weights `{path}`)"
    injections = distill.get("injections") or []
    taps = ", ".join(str(i.get("tap", "?")) for i in injections if isinstance(i, Mapping)) or "F5"
    gam = (distill.get("gam") or {}).get("enabled")
    layer_words = f" (its layer {layer})" if layer else ""
    return f"{what}{layer_words}, injected at {taps}" + (" with GAM weighting" if gam else "")


def _data(train_cfg: Mapping[str, Any], dataset: str | None) -> str:
    """The training data in words, without the local paths of the machine it was trained on."""
    data = train_cfg.get("data") or {}
    if dataset:
        what = f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    elif data.get("synth"):
        what = "the framework's embedded synthetic dataset (`distill data synth`)"
    elif data.get("root"):
        fmt = data.get("format") or "auto"
        what = f"`{os.path.basename(os.path.normpath(str(data['root'])))}`" + (f" ({fmt.upper()} format)"
                                                                                 if fmt != "auto" else "")
    elif data.get("train_ann"):
        what = f"a COCO-format dataset (`{os.path.basename(str(data['train_ann']))}`)"
    else:
        what = "not recorded"
    size = data.get("img_size")
    return what + (f", trained at {size} x {size} px" if size else "")


def _card_body(weights: Weights, config: Mapping[str, Any], train_cfg: Mapping[str, Any], metrics: Mapping[str, float],
               summary: Mapping[str, Any], teacher: str, repo_id: str, dataset: str | None, title: str) -> str:
    name = config["name"]
    names = config.get("class_names") or []
    shown = ", ".join(f"`{n}`" for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    h, w = config.get("input_size") or (0, 0)
    schedule = train_cfg.get("schedule") or {}
    lines = [
        f"# {title}",
        "",
        f"A real-time DETR detector, the `{name}` student of the `{FRAMEWORK}` framework (version "
        f"{config['framework']['version']}), trained "
        + (f"with feature distillation from {teacher}." if teacher else "without distillation."),
        "",
        "| | |",
        "| --- | --- |",
        f"| student | `{name}` |",
        f"| teacher | {teacher or 'none'} |",
        f"| data | {_data(train_cfg, dataset)} |",
        f"| classes | {len(names)}: {shown} |",
        f"| input | {h} x {w} RGB in [0, 1] (the model normalises its own input) |",
    ]
    if schedule.get("epochs"):
        lines.append(f"| schedule | {schedule['epochs']} epochs; these weights: epoch {weights.epoch} (best AP) |")
    if summary.get("params"):
        lines.append(f"| parameters | {summary['params'] / 1e6:.2f} M |")
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["COCO box metrics on the run's validation set:", "", "| metric | value |", "| --- | --- |"]
        # COCO reports -1 for a size class without ground truth objects
        lines += [f"| {label} | {metrics[key]:.4f} |" if metrics[key] >= 0 else f"| {label} | n/a (no such objects) |"
                  for key, label in _CARD_METRICS.items() if key in metrics]  # fmt: skip
    else:
        lines.append("Not recorded with these weights.")
    lines += [
        "",
        "## How to use",
        "",
        f"With {FRAMEWORK} installed, every command and function that takes a checkpoint takes this model's id "
        "(downloaded with `huggingface_hub`) or a local copy of this directory:",
        "",
        "```python",
        "import distill",
        "",
        f'detections = distill.predict(["image.jpg"], checkpoint="{repo_id}", threshold=0.3)',
        '# [{"image": "image.jpg", "boxes": [[x0, y0, x1, y1], ...], "labels": [...], "names": [...],',
        '#    "scores": [...]}]',
        "",
        "from students.load import load_student",
        "",
        f'model = load_student("{repo_id}")  # a torch.nn.Module in eval mode',
        "```",
        "",
        "```bash",
        f"distill predict --checkpoint {repo_id} image.jpg --out predictions/",
        f"distill export --checkpoint {repo_id} --out {name}.onnx",
        f"distill eval my_data.yaml --checkpoint {repo_id}",
        "```",
        "",
        f"To fine-tune it, set `model.pretrained: {repo_id}` in a training config.",
        "",
        "Boxes are `[x0, y0, x1, y1]` in pixels of the original image; labels index the class names of "
        "`config.json`.",
        "",
    ]
    return "\n".join(lines)
