"""The student detector: backbone -> encoder -> decoder, plus feature taps and GAM component groups.

Input convention: images are ``B x 3 x H x W`` floats in [0, 1] for every scale. The official DEIMv2 ViT variants
apply the ImageNet ``Normalize`` in their data pipeline (after ``ConvertPILImage``, before collate); here the
model applies it as its first operation instead (``normalize_input``), so the data pipeline, the teacher and
``predict`` share one input format. This is the same function: every later batch-level operation of the official
pipeline (MixUp, CopyBlend blending, nearest multi-scale resize) is a convex combination or a pixel copy, which
commutes with a per-channel affine map. The mean/std are non-persistent buffers, so state-dict keys are the
official ones.

Taps (declared metadata, checked by a dummy forward at build):

* ``S3``/``S4``/``S5``: backbone outputs at strides 8/16/32 (those the scale has);
* ``F5``: the stride-32 encoder map ``encoder.f5`` (AIFI output for HybridEncoder, ``bi_fusion`` output for
  LiteEncoder), where RT-DETRv4 distils;
* ``P3``/``P4``/``P5``: encoder outputs at strides 8/16/32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnknownNameError
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

_LEVEL = {8: "3", 16: "4", 32: "5"}
GROUPS = ("backbone", "aifi", "ccff", "decoder")


@dataclass(frozen=True)
class Tap:
    """A named feature map: the output of ``module`` (its element ``index`` when the module returns a list),
    ``B x channels x H/stride x W/stride``."""

    name: str
    module: str
    index: int | None
    channels: int
    stride: int


class TapCapture:
    """Forward hooks that store the tapped maps of each forward in :attr:`features` (graph kept, not detached).

    Use as a context manager (``with model.capture(['F5']) as feats: model(x)``) or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, taps: list[Tap]):
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for tap in taps:
            module = model.get_submodule(tap.module)
            self._handles.append(module.register_forward_hook(self._hook(tap)))

    def _hook(self, tap: Tap):
        def store(_module, _inputs, output):
            self.features[tap.name] = output if tap.index is None else output[tap.index]

        return store

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> dict[str, torch.Tensor]:
        return self.features

    def __exit__(self, *exc) -> None:
        self.remove()


class Detector(nn.Module):
    """DEIM / DEIMv2 / DEIM-RT-DETRv2 student. Submodule names match the official ``DEIM`` model, so official
    state dicts load unchanged (``backbone.*``, ``encoder.*``, ``decoder.*``); the postprocessor has no state.

    Args:
        backbone: images ``B x 3 x H x W`` -> list of maps; has ``out_channels``/``out_strides``.
        encoder: that list -> list of maps; has ``out_channels``/``out_strides`` and an ``f5`` Identity.
        decoder: (encoder maps, targets) -> output dict (``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4).
        postprocessor: (outputs, orig_sizes) -> per-image detections.
        name: registry name of the scale (recorded in saved checkpoints).
        normalize_input: apply the ImageNet mean/std to the [0, 1] input (DEIMv2 ViT variants).
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        postprocessor: nn.Module,
        *,
        name: str = "",
        num_classes: int = 80,
        input_size: tuple[int, int] = (640, 640),
        normalize_input: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.postprocessor = postprocessor
        self.name = name
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.normalize_input = normalize_input
        self.deployed = False
        if normalize_input:
            self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.taps: dict[str, Tap] = self._declare_taps()
        self.compiled_regions: tuple[str, ...] = ()  # submodules whose forward is compiled (set by the compiler)

    # ---- forward / inference -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        """images ``B x 3 x H x W`` in [0, 1]; targets (training, for denoising) ``[{'labels': N, 'boxes': N x 4
        normalised cxcywh}]``. Returns the decoder's output dict."""
        return self.decoder(self.encoder(self.backbone(self._normalize(images))), targets)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std if self.normalize_input else images

    def tap_features(self, images: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """images ``B x 3 x H x W`` in [0, 1] -> the named taps (``B x C x h x w``). Runs backbone + encoder only:
        every tap lives there, so the decoder (and its minimum token count for the queries) is not needed."""
        with self.capture(names) as feats:
            self.encoder(self.backbone(self._normalize(images)))
        return dict(feats)

    def postprocess(self, outputs: dict, orig_sizes: torch.Tensor):
        """Top-k detections per image; ``orig_sizes`` is ``B x 2`` (width, height), the official convention:
        boxes come back as absolute xyxy in that frame."""
        return self.postprocessor(outputs, orig_sizes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, orig_sizes: torch.Tensor | None = None):
        """Eval-mode forward + postprocess. Without ``orig_sizes`` boxes are in the input image's pixels."""
        was_training = self.training
        self.eval()
        try:
            outputs = self(images)
        finally:
            self.train(was_training)
        if orig_sizes is None:
            h, w = images.shape[-2:]
            orig_sizes = torch.tensor([[w, h]], device=images.device).expand(images.shape[0], 2)
        return self.postprocess(outputs, orig_sizes)

    def deploy(self) -> Detector:
        """Eval mode, then ``convert_to_deploy()`` on every sub-module that has it (RepVGG / conv-BN fusion,
        decoder truncated to ``eval_idx``), as the official ``DEIM.deploy``. In place; returns self.

        The postprocessor is left alone, so :meth:`postprocess` keeps returning per-image dicts; for an ONNX graph
        call ``model.postprocessor.deploy()`` as well (tensor outputs)."""
        self.eval()
        # the list is taken first because conversions replace sub-modules while we walk
        for module in [m for part in (self.backbone, self.encoder, self.decoder) for m in part.modules()]:
            if hasattr(module, "convert_to_deploy"):
                module.convert_to_deploy()
        self.deployed = True
        return self

    # ---- taps --------------------------------------------------------------------------------------------------
    def _declare_taps(self) -> dict[str, Tap]:
        taps = {}
        for i, (c, s) in enumerate(zip(self.backbone.out_channels, self.backbone.out_strides)):
            if s in _LEVEL:
                taps[f"S{_LEVEL[s]}"] = Tap(f"S{_LEVEL[s]}", "backbone", i, int(c), int(s))
        enc_channels, enc_strides = list(self.encoder.out_channels), list(self.encoder.out_strides)
        if 32 in enc_strides:
            f5_channels = getattr(self.encoder, "hidden_dim", enc_channels[enc_strides.index(32)])
            taps["F5"] = Tap("F5", "encoder.f5", None, int(f5_channels), 32)
        for i, (c, s) in enumerate(zip(enc_channels, enc_strides)):
            if s in _LEVEL:
                taps[f"P{_LEVEL[s]}"] = Tap(f"P{_LEVEL[s]}", "encoder", i, int(c), int(s))
        return taps

    def capture(self, names: Iterable[str]) -> TapCapture:
        """Hooks storing the named taps (``B x C x h x w`` each, graph kept) on every forward."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.taps]
        if unknown:
            raise UnknownNameError(
                f"unknown tap(s) {unknown} for {self.name or 'this student'}; valid: {list(self.taps)}"
            )
        for name in names:
            module = self.taps[name].module
            region = next((r for r in self.compiled_regions if module.startswith(r + ".")), None)
            if region is not None:
                raise ValueError(f"tap {name!r} ({module}) lies inside {region!r}, whose forward torch.compile "
                                 f"compiled for this run: a hook registered now would not fire there. Name the "
                                 f"tap when compiling, so that the compiled regions leave it out")  # fmt: skip
        return TapCapture(self, [self.taps[n] for n in names])

    @torch.no_grad()
    def dummy_tap_features(self, size: int = 64, names: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Backbone + encoder on a random ``2 x 3 x size x size`` batch, leaving no trace: train mode (no eval-time
        caches tied to ``eval_spatial_size``), then the mode, the RNG and the buffers (BatchNorm statistics) put
        back. Returns the named taps."""
        saved = {k: b.clone() for k, b in self.named_buffers()}
        was_training = self.training
        device = next(self.parameters()).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.train()
                return self.tap_features(torch.rand(2, 3, size, size, device=device), names)
        finally:
            self.train(was_training)
            for k, b in self.named_buffers():
                b.copy_(saved[k])

    def check_taps(self, size: int = 64) -> None:
        """Compare every tap of a dummy forward (:meth:`dummy_tap_features`) with its declared channels/stride."""
        feats = self.dummy_tap_features(size, self.taps)
        for tap in self.taps.values():
            got = feats.get(tap.name)
            want = (2, tap.channels, size // tap.stride, size // tap.stride)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise RuntimeError(f"tap {tap.name} ({tap.module}[{tap.index}]) gave {shape}, declared {want}")

    # ---- parameter groups for GAM ------------------------------------------------------------------------------
    def aifi_module(self) -> nn.Module:
        """The module whose gradient share GAM watches: the AIFI transformer layers (``encoder.encoder``) of a
        HybridEncoder; a LiteEncoder has no transformer, so its global-context fusion ``encoder.bi_fusion`` (the
        producer of F5) stands in."""
        for attr in ("encoder", "bi_fusion"):
            module = getattr(self.encoder, attr, None)
            if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
                return module
        raise AttributeError(f"{type(self.encoder).__name__} has neither 'encoder' (AIFI) nor 'bi_fusion'")

    def component_groups(self) -> dict[str, list[nn.Parameter]]:
        """{'backbone', 'aifi', 'ccff', 'decoder'} -> trainable parameters, grouped by module object (never by
        name). ccff = the encoder outside AIFI (input_proj, lateral/FPN/downsample/PAN); decoder = everything
        else. Shared (tied) parameters appear once."""
        groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
        seen: set[int] = set()
        aifi = set(map(id, self.aifi_module().parameters()))

        def add(group: str, params: Iterator[nn.Parameter]) -> None:
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    groups[group].append(p)

        add("backbone", self.backbone.parameters())
        add("aifi", self.aifi_module().parameters())
        add("ccff", (p for p in self.encoder.parameters() if id(p) not in aifi))
        add("decoder", self.parameters())
        return groups
