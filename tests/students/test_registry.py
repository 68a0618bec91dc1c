"""Registry data and model structure of every scale against the official figures (docs/OFFICIAL.md §2.5).

Params depend only on the module structure, so the large scales are built on the ``meta`` device (no memory, no
weight init, no forward): this keeps the whole file fast while still counting every parameter exactly.
"""

import pytest
import torch

from students import build_student, get_spec, list_students
from students.flops import count_params
from students.registry import FAMILIES, STUDENTS

# docs/OFFICIAL.md §2.5, copied by hand: name -> (input, params, deploy params, README params M, README GFLOPs)
SPEC_25 = {
    "deim_dfine_n": (640, 3_782_693, 3_753_799, 4.0, 7.0),
    "deim_dfine_s": (640, 10_321_877, 10_237_491, 10.0, 25.0),
    "deim_dfine_m": (640, 19_590_064, 19_248_189, 19.0, 57.0),
    "deim_dfine_l": (640, 31_289_848, 30_769_891, 31.0, 91.0),
    "deim_dfine_x": (640, 62_715_480, 61_695_555, 62.0, 202.0),
    "deimv2_atto": (320, 508_985, 494_159, 0.49, 0.8),
    "deimv2_femto": (416, 983_945, 962_311, 1.0, 1.7),
    "deimv2_pico": (640, 1_539_539, 1_514_285, 1.5, 5.2),
    "deimv2_n": (640, 3_600_421, 3_571_527, 3.6, 6.8),
    "deimv2_s": (640, 9_779_838, 9_707_403, 9.71, 25.6),
    "deimv2_m": (640, 18_357_750, 18_106_355, 18.1, 52.2),
    "deimv2_l": (640, 32_551_214, 32_178_043, 32.2, 96.7),
    "deimv2_x": (640, 51_211_736, 50_260_163, 50.3, 151.6),
    "deim_rtdetrv2_r18": (640, 20_183_440, 19_979_152, 20.0, 60.0),
    "deim_rtdetrv2_r34": (640, 31_440_644, 31_236_356, 31.0, 92.0),
    "deim_rtdetrv2_r50m": (640, 33_198_864, 32_994_576, 33.0, 100.0),
    "deim_rtdetrv2_r50": (640, 42_943_596, 42_144_876, 42.0, 136.0),
    "deim_rtdetrv2_r101": (640, 76_660_716, 74_872_812, 76.0, 259.0),
}
VIT_SCALES = {"deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x"}


def test_every_scale_registered_once_in_order():
    assert list_students() == list(SPEC_25)
    assert list_students("deimv2") == [n for n in SPEC_25 if n.startswith("deimv2_")]
    assert {s.family for s in STUDENTS.values()} == set(FAMILIES)
    for name, spec in STUDENTS.items():
        assert spec.name == name and name.startswith(spec.family + "_")


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        build_student("deimv2_huge")
    assert "deimv2_huge" in str(err.value) and "deim_rtdetrv2_r101" in str(err.value)


@pytest.mark.parametrize("name", list(SPEC_25))
def test_spec_matches_official_facts(name):
    spec = get_spec(name)
    size, params, deploy, readme_m, readme_gf = SPEC_25[name]
    assert spec.input_size == (size, size)
    assert (spec.official.params, spec.official.deploy_params) == (params, deploy)
    assert (spec.official.readme_params_m, spec.official.readme_gflops) == (readme_m, readme_gf)
    assert spec.normalize_input == (name in VIT_SCALES)
    kw = spec.component_kwargs(num_classes=7)
    enc, dec = kw["encoder"], kw["decoder"]
    # the decoder reads every encoder level at the encoder's width
    assert dec["feat_strides"] == ([16, 32] if enc["feat_strides"] == [16] else enc["feat_strides"])
    assert dec["feat_channels"] == [enc["hidden_dim"]] * dec["num_levels"]
    assert dec["num_classes"] == kw["postprocessor"]["num_classes"] == 7
    assert enc["eval_spatial_size"] == dec["eval_spatial_size"] == [size, size]
    assert kw["backbone"].get("pretrained", False) is False and "weights_path" not in kw["backbone"]


def test_query_counts_and_heads_of_tiny_deimv2():
    # docs/OFFICIAL.md §2.3: Atto/Femto/Pico use 100/150/200 queries, shared bbox head, no gateway
    for name, queries in (("deimv2_atto", 100), ("deimv2_femto", 150), ("deimv2_pico", 200)):
        dec = get_spec(name).decoder_kwargs
        assert (dec["num_queries"], dec["share_bbox_head"], dec["use_gateway"]) == (queries, True, False)
    assert get_spec("deim_rtdetrv2_r50m").decoder_kwargs["eval_idx"] == 2
    assert get_spec("deim_dfine_x").decoder_kwargs["reg_scale"] == 8


def test_component_kwargs_are_fresh_copies():
    spec = get_spec("deim_dfine_s")
    spec.component_kwargs()["decoder"]["feat_strides"].append(64)
    assert spec.component_kwargs()["decoder"]["feat_strides"] == [8, 16, 32]


def test_meta_build_counts_like_a_real_build():
    real = build_student("deimv2_atto", check_taps=False)
    with torch.device("meta"):
        meta = build_student("deimv2_atto", check_taps=False)
    assert count_params(real) == count_params(meta) == SPEC_25["deimv2_atto"][1]


@pytest.mark.parametrize("name", list(SPEC_25))
def test_params_and_deploy_params_exact(name):
    with torch.device("meta"):
        model = build_student(name, check_taps=False)
    _, params, deploy, _, _ = SPEC_25[name]
    assert count_params(model) == params
    # the GAM groups partition the trainable parameters (checked here, where every scale is built anyway)
    groups = model.component_groups()
    ids = [id(p) for g in groups.values() for p in g]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert all(groups[g] for g in ("backbone", "aifi", "ccff", "decoder"))
    assert model.deploy() is model and model.deployed
    assert count_params(model) == deploy
