"""Weights in and out of a student: the one reader of every kind of weights the project accepts, and our own
save format. :func:`students.load.load_student` builds a student from any of them.

Accepted sources (:func:`read_weights`), everywhere a checkpoint is taken (``model.pretrained``, ``distill eval``,
``predict``, ``export``, ``viz``, the detector teacher):

* an official training / release ``.pth`` (DEIM, D-FINE, DEIMv2, RT-DETRv4): ``{'ema': {'module': sd}, ...}`` is
  preferred over ``{'model': sd}``, as the official loaders do; a bare state dict also works. These do not say
  which scale they hold: the caller names it;
* a DEIMv2 hub ``model.safetensors`` (original module names; a ``model.``/``module.`` prefix on every key is
  stripped) or the directory holding it;
* ``best.pt`` / ``last.pt`` written by ``distill train`` (the EMA weights where saved; the scale, classes and
  training size recorded beside them), or a run directory (its ``checkpoints/best.pt``);
* a directory written by :func:`save_student` (``config.json`` + ``model.safetensors``), such as the Hub-ready
  directory of ``distill.hub.save_hub_dir`` (its ``config.json`` also records the class names);
* a Hugging Face Hub model id (``owner/name``, ``owner/name@revision`` or ``hf://owner/name``) of any directory
  above, fetched with ``huggingface_hub.snapshot_download`` (the cache, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are
  huggingface_hub's); a path that exists locally always wins over a Hub id;
* an in-memory dict of any of the above.

Files are read with ``torch.load(..., weights_only=True)``: a checkpoint holding pickled objects is refused.

Loading is strict: missing keys, unexpected keys and shape mismatches are listed by name, with the file, in one
error. Tolerated, and listed in the returned :class:`LoadReport`: RT-DETRv4's training-only
``encoder.feature_projector.*`` (set aside), class heads whose size differs because ``num_classes`` differs (left
at their fresh init, for fine-tuning only), anchors saved for another input size (the model's own are kept: they
depend on nothing else), aliases of tied parameters that safetensors stores once, and ``num_batches_tracked``
counters that some converters drop.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MissingPathError, UserError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STUDENT_FORMAT = "rtdistill-student"
# where `distill train` keeps the best weights of a run, relative to the run directory
BEST_IN_RUN = Path("checkpoints") / "best.pt"
# decoder sub-modules whose shapes follow num_classes (K or K + 1 rows)
CLASS_HEADS = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")
# persistent buffers that are a pure function of the input size (the decoder's eval-time anchors)
SIZE_BUFFERS = ("decoder.anchors", "decoder.valid_mask")
SET_ASIDE = ("encoder.feature_projector.",)
# what a `distill train` checkpoint records besides its weights, kept in Weights.meta
META_KEYS = ("version", "epoch", "global_step", "config", "metrics", "best")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
HUB_PREFIX = "hf://"
# owner/name[@revision] as the Hub spells repository ids; a checkpoint file name never looks like this
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt", ".yaml", ".yml", ".json")
_HUB_FILES = ["*.safetensors", "*.json", "*.md"]
_MAX_LISTED = 40


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked; the message names the file."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint does not fit the model; the message names the file and every offending key."""


@dataclass
class Weights:
    """A student's weights as read from any accepted source, with what the source records about them.

    ``state`` is the student's flat state dict under its own module names (wrapper prefixes stripped).
    ``student`` / ``num_classes`` / ``input_size`` are None where the source does not record them (official
    files); ``class_names`` is empty then. ``meta`` holds the rest of a ``distill train`` checkpoint (epoch,
    config as a dict, metrics, ...).
    """

    source: str
    layout: str
    state: dict[str, torch.Tensor]
    student: str | None = None
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    input_size: tuple[int, int] | None = None
    deployed: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int | None:
        return self.meta.get("epoch")

    @property
    def config(self) -> dict:
        """The training config recorded in the checkpoint, as a dict ({} where there is none)."""
        return dict(self.meta.get("config") or {})

    def label_names(self) -> dict[int, str]:
        """Class name per contiguous label (the label itself, as text, where the source records no names)."""
        if self.class_names:
            return dict(enumerate(self.class_names))
        return {i: str(i) for i in range(self.num_classes or head_classes(self.state) or 0)}


@dataclass
class LoadReport:
    """What :func:`load_official` did. ``set_aside`` keeps the tensors (e.g. the RT-DETRv4 projector)."""

    source: str
    layout: str
    loaded: int = 0
    set_aside: dict[str, torch.Tensor] = field(default_factory=dict)
    reinitialized: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.layout})"]
        if self.set_aside:
            parts.append(f"set aside {len(self.set_aside)} training-only keys ({', '.join(self.set_aside)})")
        if self.reinitialized:
            parts.append(f"re-initialised class heads for a different num_classes: {', '.join(self.reinitialized)}")
        if self.resized:
            parts.append(f"kept the model's {', '.join(self.resized)} for its input size")
        if self.defaulted:
            parts.append(f"kept the model's value for {len(self.defaulted)} absent num_batches_tracked counters")
        return "; ".join(parts)


# ---- reading -----------------------------------------------------------------------------------------------------
def hub_id(source: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` names a Hugging Face Hub model rather than a local path: always for
    ``hf://owner/name[@rev]``; for ``owner/name[@rev]`` only when no such path exists here and the last part has no
    checkpoint suffix (``runs/best.pt`` is a missing file, not a model id). None otherwise."""
    text = os.fspath(source)
    explicit = text.startswith(HUB_PREFIX)
    if explicit:
        text = text[len(HUB_PREFIX) :]
    elif os.path.exists(text) or text.lower().endswith(_WEIGHT_SUFFIXES):
        return None
    match = _HUB_ID.match(text)
    if match is None:
        if explicit:
            raise CheckpointError(f"{source}: not a Hub model id (hf://owner/name or hf://owner/name@revision)")
        return None
    return match["repo"], match["revision"]


def download_hub(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of the Hub model ``repo_id`` (weights, JSON and the model card only), through
    ``huggingface_hub.snapshot_download``; any failure is a :class:`CheckpointError` saying why."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = repo_id + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES))
    except LocalEntryNotFoundError as err:
        # raised offline (HF_HUB_OFFLINE=1) or without a connection when the snapshot is not in the local cache
        raise CheckpointError(f"{where}: no such local path, and the Hugging Face Hub model {repo_id!r} is not in "
                              "the local Hub cache and cannot be downloaded (HF_HUB_OFFLINE=1 or no connection)"
                              ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{where}: no such local path, and no Hugging Face Hub model {repo_id!r} (or it is "
                              "private: log in with `hf auth login` or set HF_TOKEN)") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"{where}: no such local path, and the Hugging Face Hub model {repo_id!r} could not "
                              f"be fetched: {type(err).__name__}: {err}") from err


def resolve_source(path: str | os.PathLike) -> Path:
    """The file or directory that holds the weights ``path`` names: a run directory means its ``best.pt``, a Hub
    model id its downloaded snapshot (see :func:`hub_id`)."""
    hub = hub_id(path)
    if hub is not None:
        path = download_hub(*hub)
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return path
        if (path / BEST_IN_RUN).is_file():
            return path / BEST_IN_RUN
        raise MissingPathError(f"{path}: neither a run directory (no {BEST_IN_RUN}) nor a directory of weights "
                               f"(no {WEIGHTS_NAME})")
    if not path.is_file():
        raise MissingPathError(f"{path}: no such checkpoint")
    return path


def read_weights(source: str | os.PathLike | Mapping | Weights) -> Weights:
    """Read weights of any accepted kind (see the module docstring) without building a model."""
    if isinstance(source, Weights):
        return source
    weights = _read(source)
    weights.state = _strip_wrapper_prefix(weights.state)
    return weights


def _read(source: str | os.PathLike | Mapping) -> Weights:
    if isinstance(source, Mapping):
        return _from_checkpoint(source, "<dict>")
    path = resolve_source(source)
    if path.is_dir():
        return _from_directory(path)
    if path.suffix == ".safetensors":
        return Weights(str(path), "safetensors", _load_safetensors(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice to load unsafely; its one informative line follows this marker
        detail = (str(err).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True) ({detail}): not a torch "
                              "checkpoint, or it holds pickled objects besides tensors and plain containers") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(ckpt).__name__}")
    return _from_checkpoint(ckpt, str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _from_directory(path: Path) -> Weights:
    state = _load_safetensors(path / WEIGHTS_NAME)
    config_path = path / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("format") != STUDENT_FORMAT:  # a hub directory: its config.json is not ours
        return Weights(str(path), "safetensors dir", state)
    size = config.get("input_size")
    return Weights(str(path), "saved student", state, student=config.get("name") or None,
                   num_classes=config.get("num_classes"), class_names=list(config.get("class_names") or []),
                   input_size=tuple(size) if size else None, deployed=bool(config.get("deployed")))


def _from_checkpoint(ckpt: Mapping, where: str) -> Weights:
    state, layout = _unwrap(ckpt, where)
    meta = {k: ckpt[k] for k in META_KEYS if k in ckpt}
    size = ((meta.get("config") or {}).get("data") or {}).get("img_size")
    return Weights(where, layout, state, student=ckpt.get("student") or None, num_classes=ckpt.get("num_classes"),
                   class_names=list(ckpt.get("class_names") or []), input_size=(size, size) if size else None,
                   meta=meta)


def _unwrap(ckpt: Mapping, where: str) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(ckpt.get("ema"), Mapping) and "module" in ckpt["ema"]:
        return dict(ckpt["ema"]["module"]), "ema.module"
    if isinstance(ckpt.get("model"), Mapping):
        return dict(ckpt["model"]), "model"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), "state_dict"
    raise CheckpointError(f"{where}: not a checkpoint: expected 'ema.module' or 'model' weights or a state dict, "
                          f"got keys {list(ckpt)[:10]}")


def head_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count the encoder's score head was trained for (None where the state has no such head)."""
    head = state.get("decoder.enc_score_head.weight")
    return int(head.shape[0]) if head is not None else None


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ('module.'), hub wrappers ('model.') and torch.compile ('_orig_mod.') prefix every key
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name the same tensor (tied heads, ``decoder.up`` == ``decoder.decoder.up``)."""
    by_tensor: dict[tuple, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel():
            by_tensor.setdefault(_identity(v), []).append(k)
    return [g for g in by_tensor.values() if len(g) > 1]


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {shown}{more}"


# ---- loading -----------------------------------------------------------------------------------------------------
def load_official(
    model: nn.Module, source: str | os.PathLike | Mapping | Weights, *, new_classes_ok: bool = True
) -> LoadReport:
    """Load weights of any accepted kind into ``model`` strictly; returns a :class:`LoadReport`.

    ``new_classes_ok``: class heads sized for another ``num_classes`` stay at their fresh init (fine-tuning);
    False makes that an error, for callers that use the model as it is (evaluation, export).
    Raises :class:`CheckpointMismatch` naming the file and every missing / unexpected / wrongly-shaped key.
    """
    weights = read_weights(source)
    state = dict(weights.state)
    report = LoadReport(source=weights.source, layout=weights.layout)
    report.set_aside = {k: state.pop(k) for k in list(state) if k.startswith(SET_ASIDE)}

    own = model.state_dict()
    for group in _alias_groups(model):  # a tied tensor stored under one of its names is enough
        present = [k for k in group if k in state]
        for k in group:
            if present and k not in state:
                state[k] = state[present[0]]
    for k in SIZE_BUFFERS:
        if k in state and k in own and state[k].shape != own[k].shape:
            state[k] = own[k]
            report.resized.append(k)

    for k in list(state):
        if k.startswith(CLASS_HEADS) and k in own and state[k].shape != own[k].shape:
            del state[k]
            report.reinitialized.append(k)
    if report.reinitialized and not new_classes_ok:
        raise CheckpointMismatch(
            f"{weights.source}: its class heads hold {head_classes(weights.state)} classes, the model "
            f"{getattr(model, 'num_classes', '?')} (num_classes / --num-classes): "
            f"{', '.join(report.reinitialized)}"
        )
    missing = [k for k in own if k not in state and k not in report.reinitialized]
    report.defaulted = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in report.defaulted]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {weights.source} does not fit {getattr(model, 'name', '') or type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)):
            if items:
                lines.append(_listing(title, items))
        raise CheckpointMismatch("\n".join(lines))

    model.load_state_dict(state, strict=False)
    report.loaded = len(state)
    if report.reinitialized:
        log.warning("num_classes differs from the checkpoint: class heads re-initialised (%s)",
                    ", ".join(report.reinitialized))
    if report.set_aside:
        log.info("set aside training-only keys: %s", ", ".join(report.set_aside))
    return report


# ---- our own format ------------------------------------------------------------------------------------------------
def save_student(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (scale name, num_classes, input size, deployed flag) and ``model.safetensors``.

    Tied tensors are written once (safetensors refuses shared storage); :func:`load_official` restores the aliases.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for k, v in state.items():
        ident = _identity(v)
        if v.numel() and ident in seen:
            continue
        seen.add(ident)
        keep[k] = v.detach().clone().contiguous().cpu()
    config = {
        "format": STUDENT_FORMAT,
        "version": 1,
        "name": getattr(model, "name", ""),
        "num_classes": getattr(model, "num_classes", None),
        "input_size": list(getattr(model, "input_size", ())),
        "deployed": bool(getattr(model, "deployed", False)),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(keep, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "student": config["name"]})
    return directory
