"""Plain ViTs used as DEIMv2 S/M/L/X backbones: the distilled ViT-Tiny / Tiny+ and DINOv3 ViT-S/16 / S+/16.

Both are pre-norm transformers on 16x16 patches with 2-D axial RoPE on the patch tokens (prefix tokens, i.e. CLS
and DINOv3's storage/register tokens, are left unrotated). Module attribute names follow the official code so that
official checkpoints load strictly:

- ``VisionTransformer`` (ViT-Tiny family): every weight under ``_model`` (``_model.patch_embed.proj``,
  ``_model.cls_token``, ``_model.blocks.N.*``, ``_model.rope_embed.periods``); no LayerScale, no final norm.
- ``DinoVisionTransformer`` (DINOv3 ViT-S / S+): ``cls_token``, ``storage_tokens``, ``mask_token``,
  ``patch_embed.proj``, ``rope_embed.periods``, ``blocks.N.{norm1, attn.qkv (+ bias_mask), attn.proj, ls1, norm2,
  mlp, ls2}``, ``norm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

_NORMALIZE_COORDS = ("min", "max", "separate")


# --------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------------
class RopePositionEmbedding(nn.Module):
    """2-D axial RoPE as in DINOv3: frequencies from a ``periods`` buffer (``head_dim / 4`` values).

    Patch centres are normalised to [-1, 1] (per axis with ``normalize_coords='separate'``). In training mode the
    coordinates can be shifted / jittered / rescaled by random factors: DINOv3 trains with ``rescale_coords=2``,
    i.e. one log-uniform factor in [1/2, 2] per call. Returns ``(sin, cos)``, each ``H*W x head_dim``.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"2-D RoPE needs head_dim % 4 == 0; got embed_dim={embed_dim}, num_heads={num_heads}")
        if (base is None) == (min_period is None or max_period is None):
            raise ValueError("give either base or both min_period and max_period")
        if normalize_coords not in _NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords={normalize_coords!r}; valid: {_NORMALIZE_COORDS}")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        # Not the buffer's dtype: DINOv3 pins the RoPE maths to fp32 whatever the model is cast to.
        self.dtype = dtype
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=dtype), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        dtype = self.dtype or torch.get_default_dtype()
        if self.base is not None:
            # base ** (4 i / head_dim), i = 0 .. head_dim/4 - 1
            periods = self.base ** (2 * torch.arange(n, dtype=dtype) / (self.head_dim // 2))
        else:
            ratio = self.max_period / self.min_period
            periods = self.max_period * ratio ** (torch.linspace(0, 1, n, dtype=dtype) - 1)
        with torch.no_grad():
            self.periods.copy_(periods.to(self.periods.device))

    @property
    def is_random(self) -> bool:
        """True when a forward draws random coordinate augmentations (training with any augmentation set)."""
        augment = (self.shift_coords, self.jitter_coords, self.rescale_coords)
        return self.training and any(a is not None for a in augment)

    def forward(self, *, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype or torch.get_default_dtype()}
        if self.normalize_coords == "separate":
            norm_h, norm_w = H, W
        else:
            norm_h = norm_w = max(H, W) if self.normalize_coords == "max" else min(H, W)
        ys = torch.arange(0.5, H, **dd) / norm_h
        xs = torch.arange(0.5, W, **dd) / norm_w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # HW x 2
        # Same draw order as DINOv3 (shift, jitter, rescale) so a seeded run consumes the RNG identically.
        if self.training and self.shift_coords is not None:
            coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
        if self.training and self.jitter_coords is not None:
            log_j = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, **dd).uniform_(-log_j, log_j).exp()
        if self.training and self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
        # HW x 2 x head_dim/4 -> HW x head_dim/2 laid out [y freqs, x freqs], duplicated for rotate-half pairs.
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :]).flatten(1).tile(2)
        return torch.sin(angles), torch.cos(angles)


def pad_rope_for_prefix(rope: tuple[torch.Tensor, torch.Tensor], num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend ``(sin, cos)`` (``HW x d``) with identity rotations (sin 0, cos 1) for the leading prefix tokens.

    Rotating a prefix token by angle 0 returns it unchanged exactly, which spares splitting and re-concatenating
    q and k in every attention layer.
    """
    sin, cos = rope
    return F.pad(sin, (0, 0, num_prefix, 0), value=0.0), F.pad(cos, (0, 0, num_prefix, 0), value=1.0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (pairs channel i with i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` (B x heads x N x d) by ``rope`` (N x d each); the maths runs in the rope dtype (fp32)."""
    sin, cos = rope
    xr = x.to(sin.dtype)
    return (xr * cos + rotate_half(xr) * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Transformer parts
# --------------------------------------------------------------------------------------------------------------
class LinearKMaskedBias(nn.Linear):
    """The fused qkv Linear of DINOv3: its bias is multiplied by the buffer ``bias_mask`` (1 for q and v, 0 for k).

    The key bias cannot change softmax(q k^T) anyway; DINOv3 keeps it at zero through this mask, which is stored
    in the checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3 != 0:
            raise ValueError(f"qkv out_features must be divisible by 3, got {out_features}")
        if bias:
            mask = torch.ones(out_features)
            mask[out_features // 3 : 2 * out_features // 3] = 0.0
            self.register_buffer("bias_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on q and k (SDPA). ``x``: B x N x C -> B x N x C."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = (LinearKMaskedBias if mask_k_bias else nn.Linear)(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (``... x dim`` -> ``... x dim``)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """w3(silu(w1 x) * w2 x); the gated width is 2/3 of ``hidden_dim`` rounded up to a multiple of ``align_to``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, align_to: int = 8):
        super().__init__()
        width = int(hidden_dim * 2 / 3)
        width += -width % align_to
        self.w1 = nn.Linear(dim, width, bias=bias)
        self.w2 = nn.Linear(dim, width, bias=bias)
        self.w3 = nn.Linear(width, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


_FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN}


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``gamma`` (initialised to ``init_values``)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)). ``x``: B x N x C.

    ``init_values=None`` means no LayerScale (ViT-Tiny); ``ls1``/``ls2`` are then parameter-free identities.
    """

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, ffn_layer: str = "mlp",
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, mask_k_bias: bool = False,
                 init_values: float | None = None, norm_eps: float = 1e-6):
        super().__init__()
        if ffn_layer not in _FFN_LAYERS:
            raise ValueError(f"ffn_layer={ffn_layer!r}; valid: {sorted(_FFN_LAYERS)}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = _FFN_LAYERS[ffn_layer](dim, int(dim * ffn_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv ``proj``: B x 3 x H x W -> (B x (H/p * W/p) x D, (H/p, W/p))."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, rope_embed: RopePositionEmbedding, grid: tuple[int, int],
                num_prefix: int, taps: Sequence[int]) -> list[torch.Tensor]:
    """Run ``blocks`` on tokens ``x`` (B x N x D) and return the block outputs listed in ``taps`` (in block order).

    DINOv3 evaluates its RoPE module before every block, so under train-time coordinate augmentation each block
    sees its own random rescale; without augmentation the embedding is identical and is computed once.
    """
    outs, rope = [], None
    for i, blk in enumerate(blocks):
        if rope is None or rope_embed.is_random:
            rope = pad_rope_for_prefix(rope_embed(H=grid[0], W=grid[1]), num_prefix)
        x = blk(x, rope)
        if i in taps:
            outs.append(x)
    return outs


# --------------------------------------------------------------------------------------------------------------
# ViT-Tiny / Tiny+ (DEIMv2 S / M)
# --------------------------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """DEIMv2's distilled ViT-Tiny (192 dim, 3 heads) / Tiny+ (256, 4): 1 CLS token, GELU MLP, LayerNorm eps 1e-6,
    no LayerScale, no final norm, RoPE (base 100, 'separate', no augmentation).

    forward(B x 3 x H x W) -> list over ``return_layers`` of ``(patch tokens B x (H/16 * W/16) x D, cls B x D)``,
    taken raw after those blocks (0-based).
    """

    def __init__(self, embed_dim: int = 192, num_heads: int = 3, depth: int = 12, mlp_ratio: float = 4.0,
                 patch_size: int = 16, in_chans: int = 3, qkv_bias: bool = True,
                 return_layers: Sequence[int] = (3, 7, 11)):
        super().__init__()
        bad = [i for i in return_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"return_layers {bad} out of range for depth {depth} (valid: 0..{depth - 1})")
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.return_layers = list(return_layers)
        # The official checkpoints nest everything under `_model`.
        self._model = nn.Module()
        self._model.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self._model.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._model.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, "mlp", qkv_bias=qkv_bias, norm_eps=1e-6) for _ in range(depth)
        )
        self._model.rope_embed = RopePositionEmbedding(embed_dim, num_heads=num_heads, base=100.0,
                                                       normalize_coords="separate")
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self._model.cls_token, std=0.02)
        for m in self._model.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._model.rope_embed.reset_parameters()

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self._model
        tokens, grid = m.patch_embed(x)
        tokens = torch.cat((m.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        outs = _run_blocks(m.blocks, tokens, m.rope_embed, grid, 1, self.return_layers)
        return [(o[:, 1:], o[:, 0]) for o in outs]


# --------------------------------------------------------------------------------------------------------------
# DINOv3 ViT-S/16 and ViT-S+/16 (DEIMv2 L / X)
# --------------------------------------------------------------------------------------------------------------
DINOV3_CONFIGS: dict[str, dict] = {
    "dinov3_vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
}
# Shared by both presets (DINOv3 hub configs): patch 16, 4 storage tokens, LayerScale 1e-5, LayerNorm eps 1e-5,
# qkv bias with the key part masked, RoPE base 100 'separate' with train-time rescale in [1/2, 2] (fp32).
_DINOV3_COMMON = dict(patch_size=16, n_storage_tokens=4, layerscale_init=1e-5, norm_eps=1e-5, rope_base=100.0,
                      rope_normalize_coords="separate", rope_rescale_coords=2.0)


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT-S/16 (``name='dinov3_vits16'``) or ViT-S+/16 (``'dinov3_vits16plus'``), weights-compatible with
    the DINOv3 release checkpoints. Token order: [CLS, 4 storage tokens, patches].

    ``depth`` overrides the preset depth (only for small tests; the checkpoints have 12 blocks).
    """

    def __init__(self, name: str, depth: int | None = None):
        super().__init__()
        if name not in DINOV3_CONFIGS:
            raise ValueError(f"unknown DINOv3 name {name!r}; valid: {sorted(DINOV3_CONFIGS)}")
        cfg = {**_DINOV3_COMMON, **DINOV3_CONFIGS[name]}
        if depth is not None:
            cfg["depth"] = depth
        dim = cfg["embed_dim"]
        self.num_features = self.embed_dim = dim
        self.n_blocks = cfg["depth"]
        self.num_heads = cfg["num_heads"]
        self.patch_size = cfg["patch_size"]
        self.n_storage_tokens = cfg["n_storage_tokens"]

        norm = partial(nn.LayerNorm, eps=cfg["norm_eps"])
        self.patch_embed = PatchEmbed(self.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.empty(1, self.n_storage_tokens, dim))
        self.rope_embed = RopePositionEmbedding(
            dim, num_heads=self.num_heads, base=cfg["rope_base"], normalize_coords=cfg["rope_normalize_coords"],
            rescale_coords=cfg["rope_rescale_coords"], dtype=torch.float32,
        )
        self.blocks = nn.ModuleList(
            Block(dim, self.num_heads, cfg["ffn_ratio"], cfg["ffn_layer"], mask_k_bias=True,
                  init_values=cfg["layerscale_init"], norm_eps=cfg["norm_eps"])
            for _ in range(self.n_blocks)
        )
        self.norm = norm(dim)
        # Only used by DINOv3's masked-image pre-training; kept so that the checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.empty(1, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv3's initialisation (only matters when training without the pretrained checkpoint)."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        bound = 1.0 / math.sqrt(self.patch_embed.proj.in_channels * self.patch_size**2)
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        nn.init.uniform_(self.patch_embed.proj.bias, -bound, bound)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """B x 3 x H x W -> (B x (1 + 4 + H/16 * W/16) x D tokens, patch grid (H/16, W/16))."""
        patches, grid = self.patch_embed(x)
        B = patches.shape[0]
        # `0 * mask_token` keeps the (otherwise unused) mask token in the graph, as DINOv3 does, so DDP without
        # find_unused_parameters sees a gradient for every parameter.
        cls = self.cls_token + 0 * self.mask_token
        return torch.cat((cls.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), patches), dim=1), grid

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, return_class_token: bool = False,
                                norm: bool = True) -> tuple:
        """Outputs of the blocks ``n`` (a list of 0-based indices, or an int: the last ``n`` blocks).

        Each output has the final LayerNorm applied when ``norm``; prefix tokens are stripped. Returns a tuple of
        patch tokens B x (H/16 * W/16) x D, or of ``(patch tokens, cls B x D)`` pairs with ``return_class_token``.
        """
        taps = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        bad = [i for i in taps if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {self.n_blocks}")
        tokens, grid = self.prepare_tokens(x)
        outs = _run_blocks(self.blocks, tokens, self.rope_embed, grid, 1 + self.n_storage_tokens, taps)
        if norm:
            outs = [self.norm(o) for o in outs]
        patches = [o[:, 1 + self.n_storage_tokens:] for o in outs]
        if return_class_token:
            return tuple((p, o[:, 0]) for p, o in zip(patches, outs))
        return tuple(patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens of the last block: B x (H/16 * W/16) x D."""
        return self.get_intermediate_layers(x, n=1)[0]
