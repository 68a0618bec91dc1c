"""``students.layers``: the BatchNorm2d that keeps CPU batch-norm backward on canonical layouts."""

from __future__ import annotations

import itertools

import pytest
import torch

from students.layers import BatchNorm2d


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t`` (1 x C x H x W) dense NCHW, dense channels-last, and both with a batch stride a one-image batch
    allows but no dense tensor has."""
    _, c, h, w = t.shape
    out = {"nchw": t.contiguous(), "channels_last": t.contiguous(memory_format=torch.channels_last)}
    for name, strides in (("odd_channels_last", (3, 1, w * c, c)), ("odd_nchw", (5, h * w, w, 1))):
        odd = torch.empty(t.numel() + 64, dtype=t.dtype).as_strided(t.shape, strides)
        out[name] = odd.copy_(t)
    return out


@pytest.mark.parametrize("x_layout,grad_layout", list(itertools.product(
    ["nchw", "channels_last", "odd_channels_last", "odd_nchw"], repeat=2)))
def test_batch_norm_gradients_of_a_one_image_batch_in_every_layout(x_layout, grad_layout):
    """The input and weight gradients equal those of dense NCHW tensors whatever the strides of the input and
    of the incoming gradient (torch 2.13's CPU kernel alone gets four of these sixteen pairs wrong, by ~5 in
    float64: an NCHW tensor against a channels-last-strided one with an odd batch stride)."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    grad = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    bn = BatchNorm2d(16).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref_x = x.clone().requires_grad_()
    want = torch.autograd.grad(bn(ref_x), [ref_x, bn.weight, bn.bias], grad)
    probe = _layouts(x)[x_layout].requires_grad_()
    out = bn(probe)
    torch.testing.assert_close(out, bn(x), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, [probe, bn.weight, bn.bias], _layouts(grad)[grad_layout])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_batch_norm_is_the_torch_module_for_state_dicts_and_checks():
    bn = BatchNorm2d(4)
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert list(bn.state_dict()) == list(torch.nn.BatchNorm2d(4).state_dict())
