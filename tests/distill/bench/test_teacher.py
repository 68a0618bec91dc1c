"""``distill bench teacher``: cosines to the fp32 grid, the fastest exact-enough cell, random architectures."""

import json

import pytest
import torch

from distill.bench.teacher import RANDOM_ARCHS, bench_teacher, fastest_exact, resolved_spec
from distill.cli import main as cli
from distill.errors import UserError
from teachers.base import native_bf16


def test_rows_carry_the_cosine_and_time_relative_to_fp32(monkeypatch):
    # a small random DINOv3 of the RT-DETRv4 family, through the random: spec (no download)
    monkeypatch.setitem(RANDOM_ARCHS, "tiny", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                               "intermediate_size": 128, "patch_size": 16, "num_register_tokens": 4})
    name, rows = bench_teacher("random:tiny", student_size=64, batch=1, repeats=1, policies=["match"],
                               precisions=["fp32", "bf16"])  # fmt: skip
    fp32, bf16 = rows
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["cos_mean"] == pytest.approx(1.0) and fp32["ratio_vs_fp32"] == 1.0
    assert 0.99 < bf16["cos_mean"] < 1.0 and bf16["cos_min"] <= bf16["cos_mean"]  # bf16 rounds: close, not equal
    # the ratio is of the unrounded medians; the rows' medians are rounded to 0.1 ms, which moves a ratio of
    # sub-millisecond times by tens of percent, so the ratio must lie within what the rounded medians allow
    half = 0.5e-4
    low = (bf16["median_s"] - half) / (fp32["median_s"] + half)
    high = (bf16["median_s"] + half) / max(fp32["median_s"] - half, 1e-9)
    assert low <= bf16["ratio_vs_fp32"] <= high, (bf16["ratio_vs_fp32"], low, high)
    assert bf16["auto"] == native_bf16(torch.device("cpu")) and fp32["auto"] != bf16["auto"]


def test_fastest_exact_picks_the_fastest_cell_close_enough_to_fp32():
    rows = [{"policy": "match", "precision": "fp32", "median_s": 1.0, "cos_mean": 1.0},
            {"policy": "match", "precision": "bf16", "median_s": 0.4, "cos_mean": 0.99995},
            {"policy": "match", "precision": "fp16", "median_s": 0.3, "cos_mean": 0.998},
            {"policy": "native", "precision": "bf16", "median_s": 0.2, "cos_mean": None}]  # fmt: skip
    best = fastest_exact(rows)
    assert list(best) == ["match"] and best["match"]["precision"] == "bf16"
    assert fastest_exact(rows, min_cosine=0.99999)["match"]["precision"] == "fp32"


def test_random_specs_name_a_known_architecture():
    with pytest.raises(UserError, match="unknown random teacher 'vit_giant'.*dinov3_vitb16"):
        with resolved_spec("random:vit_giant"):
            pass
    with resolved_spec("some/dir") as spec:
        assert spec == "some/dir"
    assert RANDOM_ARCHS["dinov3_vitb16"]["hidden_size"] == 768  # the RT-DETRv4 teacher


def test_cli_json_keeps_one_row_per_cell(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(RANDOM_ARCHS, "tiny", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 64, "patch_size": 16, "num_register_tokens": 0})
    assert cli(["bench", "teacher", "random:tiny", "--student-size", "64", "--repeats", "1", "--policies", "match",
                "--precisions", "fp32", "--json"]) == 0  # fmt: skip
    (row,) = json.loads(capsys.readouterr().out)
    assert row["policy"] == "match" and row["teacher_input"] == [32, 32] and row["cos_mean"] == pytest.approx(1.0)
    assert cli(["bench", "teacher", "random:tiny", "--student-size", "64", "--repeats", "1", "--policies", "match",
                "--precisions", "fp32", "bf16"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "cos mean" in text and "match: fastest within a mean cosine of 0.9999 to fp32:" in text
