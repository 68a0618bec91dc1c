"""The teacher interface: a frozen model that turns the student's batch into dense patch grids.

Every teacher owns its preprocessing. The student's augmented batch (B x 3 x H x W, values in [0, 1], any
aspect ratio) goes in; the teacher normalises it with its own mean/std, brings it to the size its input policy
asks for, runs frozen, and returns one grid B x C x h x w per requested layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from students.errors import UserError

# re-exported beside the CLIP and SigLIP statistics: the teachers pick their normalisation from this module
from students.imagenet import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STUDENT_STRIDE = 32  # the F5 / P5 grid the RT-DETRv4 teacher is aligned with


def parse_input_policy(policy) -> str | tuple[int, int]:
    """'match' | 'native' | an int | [h, w] -> 'match' | 'native' | (h, w). Fails loudly on anything else."""
    if policy in ("match", "native"):
        return policy
    if isinstance(policy, int) and policy > 0:
        return (policy, policy)
    if isinstance(policy, Sequence) and len(policy) == 2 and all(isinstance(v, int) and v > 0 for v in policy):
        return (int(policy[0]), int(policy[1]))
    raise UserError(f"teacher input policy {policy!r} is not valid: use 'match', 'native', an int or [h, w]")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively: every CUDA GPU torch runs on, and CPUs with
    AVX512-BF16 or AMX. Elsewhere bf16 autocast emulates them and is ~3x slower than fp32."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    return device.type == "cpu" and any(getattr(cpu, name, lambda: False)()
                                        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'auto' is bf16 where the device runs it natively (:func:`native_bf16`), else fp32. On a 2-core AVX512-BF16
    CPU a ViT-B/16 teacher then takes 0.37x the fp32 time at a cosine of 0.99998 to the fp32 grid (random weights;
    ``distill bench teacher`` measures any teacher, cosine included)."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision not in PRECISIONS:
        raise UserError(f"teacher precision {precision!r} is not valid; choose from {['auto', *PRECISIONS]}")
    return PRECISIONS[precision]


class Teacher(nn.Module):
    """Frozen foundation model behind one interface.

    Subclasses implement :meth:`encode` (normalised, resized pixels -> list of grids) and set ``dims``.

    Attributes:
        dims: channels of each returned grid (read from the model config), one per requested layer.
        dim: ``dims[0]``, for the common single-layer case.
        patch_size: pixels of the teacher's own input per output cell.
        stride: pixels of the *student* input per output cell (32 for ``match``, ``patch_size`` for ``native``,
            ``None`` for an explicit size, where it depends on the student's input size).
    """

    def __init__(
        self,
        name: str,
        patch_size: int,
        dims: list[int],
        mean: Sequence[float],
        std: Sequence[float],
        input: str | int | Sequence[int] = "match",
        precision: str = "auto",
    ):
        super().__init__()
        self.name = name
        self.patch_size = int(patch_size)
        self.dims = list(dims)
        self.input_policy = parse_input_policy(input)
        resolve_precision(precision, torch.device("cpu"))  # validate now, resolve per device later
        self.precision = precision
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- frozen by construction -------------------------------------------------------------------------------
    def freeze(self) -> Teacher:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never leaves eval mode (dropout off, norm statistics fixed), whatever the caller asks."""
        return super().train(False)

    @property
    def dim(self) -> int:
        return self.dims[0]

    @property
    def stride(self) -> int | None:
        if self.input_policy == "match":
            return STUDENT_STRIDE
        if self.input_policy == "native":
            return self.patch_size
        return None

    # -- preprocessing ----------------------------------------------------------------------------------------
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Teacher input size for a student image of ``height x width`` under the input policy."""
        p = self.patch_size
        if self.input_policy == "match":
            return max(1, height // STUDENT_STRIDE) * p, max(1, width // STUDENT_STRIDE) * p
        if self.input_policy == "native":
            return max(1, height // p) * p, max(1, width // p) * p
        h, w = self.input_policy
        return max(1, round(h / p)) * p, max(1, round(w / p)) * p

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> normalised B x 3 x h' x w' with h', w' multiples of the patch size."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher {self.name!r} expects B x 3 x H x W images, got {tuple(images.shape)}")
        x = (images.float() - self.mean) / self.std
        h, w = self.input_size(*x.shape[-2:])
        if (h, w) == tuple(x.shape[-2:]):
            return x
        if x.shape[-2] == 2 * h and x.shape[-1] == 2 * w:
            return F.avg_pool2d(x, 2)  # RT-DETRv4: a 640 batch pooled to 320 for a patch-16 ViT
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)

    # -- the interface ----------------------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Dense grids of the requested layers: list of B x dims[i] x h x w (fp32), no autograd history."""
        x = self.prepare(images)
        dtype = resolve_precision(self.precision, x.device)
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            grids = self.encode(x)
        # Inference tensors cannot be saved for backward: the DSI loss needs an ordinary (constant) tensor.
        return [g.float().clone() for g in grids]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.features(images)


def tokens_to_grid(tokens: torch.Tensor, num_prefix: int, height: int, width: int, name: str) -> torch.Tensor:
    """B x N x C tokens (prefix tokens first) -> B x C x h x w from the true grid size (never sqrt(N))."""
    b, n, c = tokens.shape
    if n - num_prefix != height * width:
        raise ValueError(
            f"teacher {name!r}: {n} tokens minus {num_prefix} prefix tokens != {height}x{width} patch grid"
        )
    return tokens[:, num_prefix:].transpose(1, 2).reshape(b, c, height, width)
