"""FLOP counting and the ``distill zoo`` command (every scale against the official count: test_flops.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.cli import main as cli
from students import build_student
from students.flops import count_flops, count_params


class _Attention(nn.Module):
    """nn.MultiheadAttention (fused inference path) + a bare SDPA call on L tokens of width D."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.heads = heads
        self.input_size = (4, 4)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        tokens = images.flatten(2).transpose(1, 2).repeat(1, 1, 6)[..., :16]  # B x 16 x 16
        a = self.mha(tokens, tokens, tokens)[0]
        q = tokens.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # B x H x L x D/H
        return a.sum() + F.scaled_dot_product_attention(q, q, q).sum()


def test_attention_is_counted_once_by_hand():
    length, dim = 16, 16
    projections = 2 * length * dim * 3 * dim + 2 * length * dim * dim  # in_proj (q, k, v) + out_proj
    attention = 2 * (2 * length * length * dim)  # q @ k^T and attn @ v, all heads together
    model = _Attention().eval()
    assert torch.backends.mha.get_fastpath_enabled()
    assert count_flops(model) == projections + attention + attention  # MHA + the bare SDPA
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert not model.training




def test_count_params_counts_tied_weights_once():
    model = build_student("deimv2_atto", check_taps=False)
    heads = model.decoder.dec_bbox_head
    assert heads[0].layers[0].weight is heads[1].layers[0].weight
    by_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_params(model) < by_name
    assert count_params(model) == 508_985  # docs/OFFICIAL.md §2.5
    assert count_params(model, trainable_only=True) == 508_983  # up, reg_scale are frozen (official JSON)


def test_zoo_json(capsys):
    assert cli(["zoo", "--json", "--names", "deimv2_atto", "deim_rtdetrv2_r18", "--no-flops"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["deimv2_atto", "deim_rtdetrv2_r18"]
    assert rows[1]["params"] == 20_183_440 and rows[1]["deploy_params"] == 19_979_152
    assert rows[1]["params_diff"] == 0 and rows[1]["gflops"] is None
    assert rows[0]["family"] == "deimv2" and rows[0]["input_size"] == [320, 320]

    assert cli(["zoo", "--json", "--names", "deimv2_atto"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert isinstance(row["params"], int) and row["gflops"] == pytest.approx(0.76, rel=0.02)
    assert row["official_gflops"] == 0.76 and abs(row["gflops_diff_pct"]) < 2


def test_zoo_table_and_unknown_name(capsys):
    assert cli(["zoo", "--names", "deimv2_atto", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "deimv2_atto" in out and "508985" in out and "494159" in out
    assert cli(["zoo", "--names", "deimv2_giant"]) == 2
    assert "deim_dfine_n" in capsys.readouterr().err
