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
