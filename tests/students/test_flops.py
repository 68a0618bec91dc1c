"""GFLOPs of every one of the 18 scales against the official models.

tests/data/golden/flops_{DEIM,DEIMv2}.json hold the exact FLOP counts of the official models (as built from
their YAML and after their ``deploy()``), counted by ``distill parity --golden`` with the same counter as ours
(:func:`students.flops.count_flops`). Ours are counted on the meta device (shapes only, no weights, no
arithmetic), so all 18 scales take seconds.

What is tested:

* exactly equal counts, apart from one term the counter misses in the official code and sees in ours: the D-FINE
  head's ``Integral`` (softmax of the corner logits times W, 2 * Q * 4 * (reg_max + 1) FLOPs per decoder layer).
  The official code calls ``F.linear`` with a 1-D weight, which dispatches to ``aten.mv``, an op
  FlopCounterMode has no formula for; ours passes a 1 x (reg_max + 1) weight (``aten.mm``). Same arithmetic.
* the docs/OFFICIAL.md §2.5 figures in :mod:`students.registry` (two decimals) are those exact official counts rounded;
* against those two-decimal figures ours are within 0.43% for all 18 scales and within 0.014% for all but the
  five smallest (Atto, Femto, Pico, DEIMv2-N, DEIM-D-FINE-N). The rounding of the figures, not the models, makes
  these gaps (Atto's deploy count 0.756717 GFLOPs prints as 0.76).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from students import build_student, get_spec
from students.flops import count_flops
from students.registry import STUDENTS

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"
FIVE_SMALLEST = ("deimv2_atto", "deimv2_femto", "deimv2_pico", "deimv2_n", "deim_dfine_n")
ALL_SCALES_PCT = 0.43  # measured max 0.4216% (Atto deploy: 0.7567 vs the printed 0.76)
OTHER_SCALES_PCT = 0.014  # measured max 0.0134% (DEIM-D-FINE-S: 25.6734 vs the printed 25.67)


def official_counts() -> dict[str, dict]:
    counts = {}
    for path in sorted(GOLDEN_DIR.glob("flops_*.json")):
        counts.update(json.loads(path.read_text())["scales"])
    return counts


OFFICIAL = official_counts()


def integral_flops(name: str) -> int:
    """FLOPs of the D-FINE head's Integral in one eval forward: every decoder layer decodes its boxes."""
    spec = get_spec(name)
    if spec.decoder not in ("DFINETransformer", "DEIMTransformer"):
        return 0
    kw = spec.decoder_kwargs
    return 2 * kw["num_queries"] * 4 * (kw["reg_max"] + 1) * kw["num_layers"]


@pytest.fixture(scope="module")
def ours() -> dict[str, tuple[int, int]]:
    """(as built, after deploy()) FLOPs of every scale, counted on the meta device."""
    counted = {}
    for name in STUDENTS:
        with torch.device("meta"):
            # .to: a few buffers are made with an explicit CPU device (eval-time anchors)
            model = build_student(name, check_taps=False).to("meta")
        built = count_flops(model)
        counted[name] = (built, count_flops(model.deploy()))
    return counted


def test_every_scale_has_an_official_count():
    assert sorted(OFFICIAL) == sorted(STUDENTS)
    for name, entry in OFFICIAL.items():
        assert entry["input_size"] == list(get_spec(name).input_size), name


def test_meta_counts_equal_real_counts():
    model = build_student("deimv2_atto", check_taps=False)
    with torch.device("meta"):
        meta = build_student("deimv2_atto", check_taps=False).to("meta")
    assert count_flops(meta) == count_flops(model)


@pytest.mark.parametrize("name", list(STUDENTS))
def test_flops_equal_the_official_count(ours, name):
    built, deployed = ours[name]
    extra = integral_flops(name)
    assert built - OFFICIAL[name]["flops"] == extra
    assert deployed - OFFICIAL[name]["deploy_flops"] == extra


@pytest.mark.parametrize("name", list(STUDENTS))
def test_registry_figures_are_the_official_counts_rounded(name):
    official = get_spec(name).official
    assert abs(OFFICIAL[name]["flops"] / 1e9 - official.gflops) <= 0.005 + 1e-9
    assert abs(OFFICIAL[name]["deploy_flops"] / 1e9 - official.deploy_gflops) <= 0.005 + 1e-9


def test_percent_gaps_to_the_printed_figures(ours):
    gaps = {}
    for name, (built, deployed) in ours.items():
        official = get_spec(name).official
        gaps[name] = max(abs(built / 1e9 / official.gflops - 1), abs(deployed / 1e9 / official.deploy_gflops - 1))
    assert max(gaps.values()) * 100 <= ALL_SCALES_PCT
    assert max(g for n, g in gaps.items() if n not in FIVE_SMALLEST) * 100 <= OTHER_SCALES_PCT
