"""Official checkpoints load strictly into the students; our own save format round-trips exactly.

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
from students.checkpoint import CheckpointMismatch, load_official, load_student, save_student

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
    with pytest.raises(pickle.UnpicklingError):
        load_official(build_student("deimv2_atto", check_taps=False), tmp_path / "evil.pth")


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
