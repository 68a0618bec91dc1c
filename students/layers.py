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


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm with canonical layouts
# ---------------------------------------------------------------------------------------------------------------
def _canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N x C x H x W) if its strides are exactly the dense NCHW or channels-last ones, else a dense copy in
    the layout it is contiguous in. With a size-1 dimension (a one-image batch) a tensor can pass
    ``is_contiguous(memory_format=...)`` with other strides than the dense ones."""
    n, c, h, w = t.shape
    if t.stride() in ((c * h * w, h * w, w, 1), (h * w * c, 1, w * c, c)):
        return t
    channels_last = t.is_contiguous(memory_format=torch.channels_last)
    return t.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class _CanonicalGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient in a canonical layout (:func:`_canonical`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _canonical(grad)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) whose training step sees its input and
    output gradient in canonical layouts when a dimension has size 1.

    Why: CPU batch-norm backward (torch 2.13) returns wrong input and weight gradients for a one-image batch when
    one of the input / output gradient is strided channels-last with a batch stride other than H*W*C and the
    other is not (relative error ~1 in float64; `tests/students/test_layers.py`). Such strides are legal for a
    size-1 batch and arise from views (concatenation slices, token transposes) in a channels-last model, so a
    one-image batch (the last batch of an epoch, one image per GPU) trained on wrong gradients silently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and x.dim() == 4 and 1 in x.shape):
            return super().forward(x)
        return _CanonicalGrad.apply(super().forward(_canonical(x)))
