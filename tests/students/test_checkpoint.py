"""Official checkpoints load strictly into the students; our own save format round-trips exactly; every kind of
weights the project accepts goes through the one reader, and its errors name the file and the keys.

The official state dicts are synthesised from tests/data/official_state_dicts/*.json (key names,
shapes and dtypes of the official models, with the tied keys the official models share): random values, saved in
the layouts the official tools write.
"""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from students import build_student
from students.checkpoint import (
    SIZE_BUFFERS,
    CheckpointError,
    CheckpointMismatch,
    load_official,
    read_weights,
    save_student,
)
from students.errors import MissingPathError, UserError
from students.load import load_student

REF = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts"
# reference file -> our scale (RT-DETRv4-S is DEIM-D-FINE-S plus a training-only projector)
REFS = {
    "deim_dfine_n": "deim_dfine_n",
    "deim_dfine_s": "deim_dfine_s",
    "deimv2_atto": "deimv2_atto",
    "deimv2_pico": "deimv2_pico",
    "deimv2_n": "deimv2_n",
    "deimv2_s": "deimv2_s",
    "rtdetrv4_s": "deim_dfine_s",
}
DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def official_state(ref: str) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Random tensors with the official keys/shapes/dtypes; tied keys hold one shared value."""
    info = json.loads((REF / f"{ref}.json").read_text())
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, (shape, dtype) in info["state_dict"].items():
        if dtype == "float32":
            state[key] = torch.randn(shape, generator=g)
        elif dtype == "int64":
            state[key] = torch.randint(0, 1000, shape, generator=g)
        else:
            state[key] = torch.rand(shape, generator=g) > 0.5
        assert state[key].dtype == DTYPES[dtype]
    for group in info["shared_state_dict_keys"]:
        for key in group[1:]:
            state[key] = state[group[0]]
    return state, info["shared_state_dict_keys"]


def assert_arrived(model, state, skip=()):
    own = model.state_dict()
    for key, value in state.items():
        if key in skip:
            continue
        assert own[key].dtype == value.dtype, key
        assert torch.equal(own[key], value), f"{key} did not arrive"


@pytest.mark.parametrize("ref", list(REFS))
def test_official_release_layout_loads_strictly(ref, tmp_path):
    state, _ = official_state(ref)
    path = tmp_path / "release.pth"
    torch.save({"model": state}, path)  # tools/reference/convert_weight.py layout
    model = build_student(REFS[ref], check_taps=False)
    report = load_official(model, path)
    projector = [k for k in state if k.startswith("encoder.feature_projector.")]
    assert sorted(report.set_aside) == sorted(projector)
    assert (ref == "rtdetrv4_s") == bool(projector)
    assert report.layout == "model" and not report.reinitialized and not report.defaulted
    assert_arrived(model, state, skip=projector)


@pytest.mark.parametrize("ref", ["deimv2_atto", "deim_dfine_n"])
def test_training_checkpoint_prefers_ema_and_hub_safetensors(ref, tmp_path):
    state, shared = official_state(ref)
    model = build_student(REFS[ref], check_taps=False)
    # training checkpoint: 'model' holds other values; the official loaders take ema.module
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save({"model": other, "ema": {"module": state, "updates": 7}, "last_epoch": 3}, tmp_path / "last.pth")
    assert load_official(model, tmp_path / "last.pth").layout == "ema.module"
    assert_arrived(model, state)

    # hub safetensors: tied tensors stored once (as safetensors' save_model does), maybe under a 'model.' prefix
    aliases = {k for group in shared for k in group[1:]}
    hub = {f"model.{k}": v.clone() for k, v in state.items() if k not in aliases}
    save_file(hub, str(tmp_path / "model.safetensors"))
    fresh = build_student(REFS[ref], check_taps=False)
    load_official(fresh, tmp_path)  # the directory
    assert_arrived(fresh, state)
    # the tied keys still name one tensor after loading
    own = fresh.state_dict()
    for group in shared:
        assert len({own[k].data_ptr() for k in group}) == 1, group


def test_mismatches_are_named_in_one_error():
    state, _ = official_state("deimv2_atto")
    model = build_student("deimv2_atto", check_taps=False)
    bad = dict(state)
    bad["backbone.stem.stem1.convolution.weight"] = bad.pop("backbone.stem.stem1.conv.weight")
    bad["encoder.input_proj.0.conv.weight"] = torch.zeros(1, 2, 3, 4)
    with pytest.raises(CheckpointMismatch) as err:
        load_official(model, bad)
    msg = str(err.value)
    assert "missing keys (1): backbone.stem.stem1.conv.weight" in msg
    assert "unexpected keys (1): backbone.stem.stem1.convolution.weight" in msg
    assert "encoder.input_proj.0.conv.weight (1, 2, 3, 4)" in msg


def test_other_num_classes_reinitialises_only_class_heads():
    state, _ = official_state("deimv2_atto")
    model = build_student("deimv2_atto", num_classes=3, check_taps=False)
    heads = ("decoder.enc_score_head", "decoder.dec_score_head", "decoder.denoising_class_embed")
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(heads)}
    report = load_official(model, {"ema": {"module": state}})
    assert sorted(report.reinitialized) == sorted(heads_before)
    # 3 decoder layers (score head weight + bias), encoder score head, denoising embedding (K + 1 rows)
    assert len(heads_before) == 2 * 3 + 2 + 1
    assert model.state_dict()["decoder.denoising_class_embed.weight"].shape == (4, 64)
    for key, value in heads_before.items():
        assert torch.equal(model.state_dict()[key], value)
    assert_arrived(model, state, skip=heads_before)


def test_wrapper_prefix_and_absent_counters(tmp_path):
    state, _ = official_state("deim_dfine_n")
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    ddp = {f"module.{k}": v for k, v in state.items() if k not in counters}
    model = build_student("deim_dfine_n", check_taps=False)
    report = load_official(model, ddp)
    assert sorted(report.defaulted) == sorted(counters) and len(counters) > 0
    assert_arrived(model, state, skip=counters)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    state, _ = official_state("deimv2_atto")
    torch.save({"model": state, "extra": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused by torch\.load\(weights_only=True\) "
                                              r"\(Unsupported global: .*_NotATensor") as err:
        load_official(build_student("deimv2_atto", check_taps=False), tmp_path / "evil.pth")
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = build_student("deimv2_atto", num_classes=5, input_size=(160, 160)).eval()
    images = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        ref = model(images)
    save_student(model, tmp_path / "atto")
    assert json.loads((tmp_path / "atto" / "config.json").read_text())["name"] == "deimv2_atto"

    for loaded in (load_student(tmp_path / "atto"),
                   build_student("deimv2_atto", 5, pretrained=tmp_path / "atto", input_size=(160, 160))):
        loaded.eval()
        with torch.no_grad():
            out = loaded(images)
        assert torch.equal(out["pred_logits"], ref["pred_logits"])
        assert torch.equal(out["pred_boxes"], ref["pred_boxes"])
        heads = loaded.decoder.dec_bbox_head  # shared bbox head stays tied
        assert heads[0].layers[0].weight is heads[2].layers[0].weight

    model.deploy()
    with torch.no_grad():
        ref = model(images)
    save_student(model, tmp_path / "deployed")
    loaded = load_student(tmp_path / "deployed").eval()
    assert loaded.deployed
    with torch.no_grad():
        assert torch.equal(loaded(images)["pred_boxes"], ref["pred_boxes"])


# ---- one reader for every kind -------------------------------------------------------------------------------------
def _ours(detector, **extra) -> dict:
    """A checkpoint as `distill train` writes best.pt."""
    return {"version": 1, "student": detector.name, "num_classes": detector.num_classes,
            "class_names": ["a", "b", "c"], "config": {"data": {"img_size": 160}}, "epoch": 4,
            "model": detector.state_dict(), **extra}


def test_every_kind_of_weights_goes_through_one_reader(tmp_path):
    torch.manual_seed(1)
    model = build_student("deimv2_atto", num_classes=3, input_size=(160, 160), check_taps=False)
    state = model.state_dict()
    noise = {k: torch.zeros_like(v) for k, v in state.items()}
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save(_ours(model), run / "best.pt")
    # last.pt: the EMA copy is the student; 'model' and 'train_model' hold the raw training weights
    torch.save(_ours(model, model=noise, ema={"module": state}, train_model={"student.x": torch.zeros(1)}),
               run / "last.pt")
    torch.save({"model": state}, tmp_path / "release.pth")
    torch.save({"ema": {"module": state}, "model": noise, "last_epoch": 3}, tmp_path / "training.pth")
    save_file({f"model.{k}": v.clone() for k, v in state.items()}, str(tmp_path / "hub.safetensors"))
    save_student(model, tmp_path / "saved")

    kinds = {  # source -> (layout, scale recorded)
        tmp_path / "run": ("model", True),  # a run directory: its best.pt
        run / "best.pt": ("model", True),
        run / "last.pt": ("ema.module", True),
        tmp_path / "release.pth": ("model", False),
        tmp_path / "training.pth": ("ema.module", False),
        tmp_path / "hub.safetensors": ("safetensors", False),
        tmp_path / "saved": ("saved student", True),
    }
    for source, (layout, recorded) in kinds.items():
        weights = read_weights(source)
        assert weights.layout == layout, source
        assert (weights.student == "deimv2_atto") == recorded, source
        loaded = load_student(weights, student=None if recorded else "deimv2_atto")
        assert loaded.num_classes == 3 and not loaded.training, source  # official: classes from the heads
        # a recorded size is the default, else the scale's (anchors rebuilt for it)
        assert loaded.input_size == ((160, 160) if recorded else (320, 320)), source
        for key, value in state.items():
            if key not in SIZE_BUFFERS:
                assert torch.equal(loaded.state_dict()[key], value), (source, key)
    ours = read_weights(tmp_path / "run")
    assert ours.source == str(run / "best.pt") and ours.epoch == 4 and ours.input_size == (160, 160)
    assert ours.label_names() == {0: "a", 1: "b", 2: "c"}
    assert read_weights(tmp_path / "release.pth").label_names() == {0: "0", 1: "1", 2: "2"}
    assert load_student(ours, input_size=(96, 128)).input_size == (96, 128)
    # model.pretrained of a training: any kind, a run directory included, into a model of another class count
    tuned = build_student("deimv2_atto", num_classes=5, pretrained=tmp_path / "run", input_size=(160, 160))
    assert torch.equal(tuned.state_dict()["backbone.stem.stem1.conv.weight"], state["backbone.stem.stem1.conv.weight"])


def test_anchors_of_another_input_size_are_rebuilt_not_refused():
    state, _ = official_state("deimv2_atto")  # saved at the official 320 x 320
    model = build_student("deimv2_atto", input_size=(160, 160), check_taps=False)
    anchors = model.state_dict()["decoder.anchors"].clone()
    report = load_official(model, {"model": state})
    assert report.resized == ["decoder.anchors", "decoder.valid_mask"]
    assert torch.equal(model.state_dict()["decoder.anchors"], anchors)
    assert_arrived(model, state, skip=report.resized)


def test_errors_name_the_file_and_the_keys(tmp_path):
    model = build_student("deimv2_atto", num_classes=3, input_size=(160, 160), check_taps=False)
    with pytest.raises(MissingPathError, match=r"nowhere\.pth: no such checkpoint"):
        read_weights(tmp_path / "nowhere.pth")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(MissingPathError, match=r"empty_run: neither a run directory \(no checkpoints/best\.pt\)"):
        read_weights(tmp_path / "empty_run")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth: refused by torch\.load\(weights_only=True\)"):
        read_weights(tmp_path / "notes.pth")
    torch.save({"optimizer": {}, "epoch": 3}, tmp_path / "optim.pth")
    with pytest.raises(CheckpointError, match=r"optim\.pth: not a checkpoint.*\['optimizer', 'epoch'\]"):
        read_weights(tmp_path / "optim.pth")

    state = dict(model.state_dict())
    del state["encoder.input_proj.0.conv.weight"]
    state["decoder.extra.weight"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointMismatch) as err:
        load_student(tmp_path / "cut.pth", student="deimv2_atto")
    msg = str(err.value)
    assert f"checkpoint {tmp_path / 'cut.pth'} does not fit deimv2_atto" in msg
    assert "missing keys (1): encoder.input_proj.0.conv.weight" in msg and "unexpected keys (1): decoder.extra" in msg

    torch.save(_ours(model), tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt holds 'deimv2_atto', not the 'deimv2_n' asked for"):
        load_student(tmp_path / "best.pt", student="deimv2_n")
    with pytest.raises(CheckpointError, match=r"best\.pt: its class heads hold 3 classes, not the 80"):
        load_student(tmp_path / "best.pt", num_classes=80)
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    with pytest.raises(UserError, match="unknown student 'deimv2_zz'"):
        load_student(tmp_path / "official.pth", student="deimv2_zz")
    # a checkpoint is bad input, not a bug: the command prints it as one line
    assert issubclass(CheckpointMismatch, UserError)
