"""Our decoders against golden numbers of the official code.

tests/data/golden/decoder_*.json were written once by ``distill parity --golden`` from the official DEIM and
DEIMv2 checkouts (command and commits in tests/data/golden/README.md): small D-FINE, DEIMv2 (hybrid: gateway,
3 levels; lite: shared box head, no gateway, 2 levels) and RT-DETRv2 decoders in float64, with weights and inputs
from fixed formulas (:func:`distill.parity.golden_fill_`, ``golden_features``), so only summaries are stored.
Each case pins the eval outputs, every training output (with denoising: the same random draws) and the gradients
of a fixed objective per parameter and per input map.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from distill.parity import GOLDEN_DECODERS, GoldenDecoder, run_golden_decoder
from students.registry import COMPONENTS

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"
# float64 on both sides: the outputs agree to ~1e-15 relative; the gradient sums cancel, hence the abs-sum scale.
# The golden numbers come from torch 2.13; under torch 2.11 (the lent GPU machine, 2026-11-30) two sums of the
# deformable sampling's gradient moved by 2.3e-7 relative, so the tolerance is torch-version wide, not bitwise.
RTOL = 1e-6
ATOL_OF_SCALE = 1e-8


def golden(name: str) -> dict:
    return json.loads((GOLDEN_DIR / f"decoder_{name}.json").read_text())


def build(case: GoldenDecoder):
    module, attr = COMPONENTS[case.cls].split(":")
    return getattr(importlib.import_module(module), attr)(**case.build_kwargs())


def assert_summary_close(got: list[float], want: list[float], where: str, scale: float) -> None:
    """Summaries [sum, sum |x|, ...] element by element; ``scale`` (a magnitude of the tensor) sets the atol."""
    assert len(got) == len(want), where
    atol = ATOL_OF_SCALE * max(1.0, scale)
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if abs(g - w) > atol + RTOL * abs(w)]
    assert not bad, f"{where}: (index, ours, official) {bad}"


def assert_outputs_equal(got: dict, want: dict, mode: str) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, f"{mode}: outputs the official decoder has and ours lacks: {missing}"
    for path, value in want.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert_summary_close(got[path], value, f"{mode} {path}", value[1])
        else:  # integers (dn indices, group counts) and flags: exactly
            assert got[path] == value, f"{mode} {path}: ours {got[path]!r}, official {value!r}"


@pytest.fixture(scope="module", params=list(GOLDEN_DECODERS))
def case_and_result(request):
    case = GOLDEN_DECODERS[request.param]
    data = golden(case.name)
    return case, data, run_golden_decoder(build(case), case, paths=data["objective"])


def test_golden_data_is_for_this_configuration(case_and_result):
    case, data, _ = case_and_result
    assert data["kwargs"] == case.build_kwargs()
    assert data["official"]["class"] == case.cls


def test_eval_outputs_equal_official(case_and_result):
    _, data, got = case_and_result
    assert set(data["eval"]) == {"pred_logits", "pred_boxes"}
    assert_outputs_equal(got["eval"], data["eval"], "eval")


def test_training_outputs_equal_official(case_and_result):
    case, data, got = case_and_result
    assert_outputs_equal(got["train"], data["train"], "train")
    assert "dn_meta.dn_num_group" in data["train"]  # denoising was on
    if case.cls != "RTDETRTransformerv2":
        assert "aux_outputs.0.teacher_corners" in data["train"]  # the FDR / DDF path was exercised


def test_gradients_equal_official(case_and_result):
    _, data, got = case_and_result
    assert sorted(got["grads"]) == sorted(data["grads"]), "parameter names differ from the official decoder's"
    for name, want in data["grads"].items():
        if want is None:
            assert got["grads"][name] is None, f"{name}: ours has a gradient, the official parameter has none"
            continue
        assert got["grads"][name] is not None, f"{name}: no gradient in ours"
        assert_summary_close(got["grads"][name], want, f"grad {name}", want[1])
    for i, (g, w) in enumerate(zip(got["input_grads"], data["input_grads"], strict=True)):
        assert_summary_close(g, w, f"grad of input map {i}", w[1])
