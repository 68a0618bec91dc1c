"""Small layers shared by every student family: activations, the box/score MLP head, init helpers."""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
}


def get_activation(act: str | nn.Module | None) -> nn.Module:
    """An activation module from its official config name (``None`` -> identity)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    try:
        return _ACTIVATIONS[act.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; valid: {sorted(_ACTIVATIONS)} or None") from None


class MLP(nn.Module):
    """``num_layers`` Linear layers with ``act`` between them. Input ``... x input_dim`` -> ``... x output_dim``.

    The attribute name ``layers`` matches the official checkpoints (``*.layers.{i}.weight``).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both odds terms clamped at ``eps`` (the official convention)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Bias b with sigmoid(b) = prior_prob: class heads start by predicting 'background' everywhere."""
    return float(-math.log((1 - prior_prob) / prior_prob))


class _CatDenseGrads(torch.autograd.Function):
    """``torch.cat`` whose backward hands every input a dense gradient in that input's own layout."""

    @staticmethod
    def forward(ctx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.dim, ctx.sizes = dim, [t.shape[dim] for t in tensors]
        ctx.formats = [torch.channels_last if t.dim() == 4 else torch.contiguous_format for t in tensors]
        return torch.cat(tensors, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = grad.split(ctx.sizes, ctx.dim)
        return (None, *(g.contiguous(memory_format=f) for g, f in zip(parts, ctx.formats)))


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.is_contiguous()


def cat_dense_grads(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(tensors, dim)``; when every input is channels-last (4-d) or contiguous (tokens of a channels-last
    map), each input's gradient comes back as a dense copy instead of a strided slice of the concatenation's.

    A BatchNorm whose output goes straight into a concatenation (no activation between them, whose backward
    would write a fresh tensor) otherwise gets that slice, and CPU BatchNorm backward on a tensor that is dense
    in neither layout runs 3 to 10x slower than the copy costs. NCHW models keep the plain ``torch.cat``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and all(_dense(t) for t in tensors):
        return _CatDenseGrads.apply(dim, *tensors)
    return torch.cat(tensors, dim)

