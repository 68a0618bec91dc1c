"""Our criterion against golden loss terms of the official code, for every family.

tests/data/golden/criterion_*.json were written once by ``distill parity --golden`` (command and commits in
tests/data/golden/README.md): the official criterion built from each family's own YAML (DEIM-D-FINE, D-FINE, DEIM-
RT-DETRv2, RT-DETRv2, DEIMv2 S and DEIMv2 Atto: MAL / VFL, boxes, FGL / DDF, the GO union set or not), fed the
training outputs of the golden decoder of that family (see test_golden_decoders.py, which pins those outputs),
with and without denoising, and for DEIMv2 one epoch before and at the matcher switch. Every term is compared.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from distill.parity import GOLDEN_CLASSES, GOLDEN_CRITERIA, GOLDEN_DECODERS, golden_loss_cases, run_golden_criterion
from students.criterion import build_criterion
from students.registry import COMPONENTS

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"
RTOL = 1e-5  # both criteria run in fp32 on the same fp32 outputs; measured agreement ~2e-7
ATOL = 1e-7


def golden(name: str) -> dict:
    return json.loads((GOLDEN_DIR / f"criterion_{name}.json").read_text())


@pytest.fixture(scope="module", params=list(GOLDEN_CRITERIA))
def case_and_result(request):
    case = GOLDEN_CRITERIA[request.param]
    data = golden(case.name)
    decoder_case = GOLDEN_DECODERS[case.decoder]
    module, attr = COMPONENTS[decoder_case.cls].split(":")
    decoder = getattr(importlib.import_module(module), attr)(**decoder_case.build_kwargs())
    criterion = build_criterion(case.ours, num_classes=GOLDEN_CLASSES)
    got = run_golden_criterion(decoder, lambda outputs, targets, epoch: criterion(outputs, targets, epoch),
                               decoder_case, data["epochs"])
    return case, data, criterion, got


def test_golden_data_is_for_this_case(case_and_result):
    case, data, criterion, _ = case_and_result
    assert (data["decoder"], data["ours"], data["official"]["config"]) == (case.decoder, case.ours, case.config)
    assert list(data["losses"]) == [label for label, _, _ in golden_loss_cases(data["epochs"])]
    assert sorted(criterion.losses) == sorted(data["losses_config"])


def test_matcher_switch_epochs(case_and_result):
    _, data, criterion, _ = case_and_result
    matcher = criterion.matcher
    if len(data["epochs"]) == 1:
        assert not matcher.change_matcher
    else:  # one epoch before and the epoch of DEIMv2's switch to the IoU-ordered cost
        before, at = data["epochs"]
        assert matcher.change_matcher and matcher.matcher_change_epoch == at == before + 1
        assert data["losses"][f"dn, epoch {before}"] != data["losses"][f"dn, epoch {at}"]  # the switch shows


@pytest.mark.parametrize("with_dn", [True, False], ids=["dn", "no_dn"])
def test_every_loss_term_equals_official(case_and_result, with_dn):
    case, data, _, got = case_and_result
    for label, want in data["losses"].items():
        if label.startswith("dn") != with_dn:
            continue
        mine = got[label]
        # the official code leaves out DDF for a layer whose prediction is its own teacher; ours reports 0
        only_ours = sorted(k for k in set(mine) - set(want) if mine[k] != 0)
        only_official = sorted(set(want) - set(mine))
        assert not only_ours and not only_official, (
            f"{case.name} [{label}]: terms only in ours {only_ours}, only in the official {only_official}")
        bad = {k: (mine[k], v) for k, v in want.items() if abs(mine[k] - v) > ATOL + RTOL * abs(v)}
        assert not bad, f"{case.name} [{label}]: term: (ours, official) {bad}"
        assert any(k.startswith("loss_") and "_dn_" in k for k in want) == with_dn
