"""Parameter and FLOP counts of a student, measured the way docs/OFFICIAL.md §2.5 measured the official models.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add) on one image at the
scale's input size, in eval mode. That counter has no formula for the CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) and cannot see inside ``nn.MultiheadAttention``'s fused
inference path (``aten._native_multi_head_attention``), so both would count as 0. We therefore

* give the counter a formula for the CPU SDPA kernel (q @ k^T and attn @ v: 2*B*H*Lq*Lk*(Dqk + Dv)), and
* switch the fused MHA path off while counting (``torch.backends.mha.set_fastpath_enabled``), so MHA runs as
  plain matmuls (or SDPA) that the counter sees.

Each attention matmul is thus counted exactly once, whichever path runs. Element-wise ops, softmax and
``grid_sample`` are not counted (as in the official figures).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Shapes: query B x H x Lq x D, key B x H x Lk x D, value B x H x Lk x Dv."""
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * lq * lk * d + 2 * n * lq * lk * dv


@contextmanager
def _mha_fastpath(enabled: bool):
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, tied ones counted once (as ``sum(p.numel() for p in model.parameters())``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int] | None = None, batch: int = 1) -> int:
    """FLOPs of one eval forward on ``batch x 3 x H x W`` (``input_size`` defaults to ``model.input_size``).

    The model's train/eval mode is restored afterwards; inputs are uniform [0, 1] images.
    """
    h, w = input_size or model.input_size
    device = next(model.parameters()).device
    images = torch.rand(batch, 3, h, w, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping={_SDPA_CPU: _sdpa_flops})
    try:
        with _mha_fastpath(False), counter:
            model(images)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_gflops(model: nn.Module, input_size: tuple[int, int] | None = None) -> float:
    """GFLOPs (1e9 FLOPs, multiply-add = 2) of one image at the model's input size."""
    return count_flops(model, input_size) / 1e9
