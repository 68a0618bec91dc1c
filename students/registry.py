"""Every student scale as plain data: the official constructor values of its three components.

One :class:`StudentSpec` per scale, keyed by name in :data:`STUDENTS`. The ``*_kwargs`` dicts hold the values of
the official YAML configs after their ``__include__`` chain is merged (DEIM ``configs/deim_dfine``,
``configs/deim_rtdetrv2``; DEIMv2 ``configs/deimv2``), with the keys the official registry shares from the top
level (``eval_spatial_size``; ``num_classes`` is added by :func:`students.build_student`). Keys that only point at
pretrained-weight downloads (``pretrained``, ``local_model_dir``, ``weights_path``) are replaced by
``pretrained=False`` / dropped: a student never downloads; the file the official code would have used is kept in
``backbone_weights`` for the record. ``official`` holds the fidelity targets of docs/OFFICIAL.md §2.5.

The training recipe (epochs, LR, augmentation, loss weights) lives with the configs, not here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .errors import UnknownNameError

FAMILIES = ("deim_dfine", "deimv2", "deim_rtdetrv2")

# official class name -> "module:attribute" of our re-implementation (imported lazily at build time)
COMPONENTS: dict[str, str] = {
    "HGNetv2": "students.hgnetv2:HGNetv2",
    "PResNet": "students.presnet:PResNet",
    "DINOv3STAs": "students.vit_sta:DINOv3STAs",
    "HybridEncoder": "students.hybrid_encoder:HybridEncoder",
    "LiteEncoder": "students.lite_encoder:LiteEncoder",
    "DFINETransformer": "students.dfine_decoder:DFINETransformer",
    "DEIMTransformer": "students.deimv2_decoder:DEIMTransformer",
    "RTDETRTransformerv2": "students.rtdetrv2_decoder:RTDETRTransformerv2",
    "PostProcessor": "students.postprocess:PostProcessor",
}

_POSTPROCESSOR = {"num_top_queries": 300, "use_focal_loss": True}


@dataclass(frozen=True)
class OfficialFigures:
    """Sizes of the official model (docs/OFFICIAL.md §2.5): as built, after ``deploy()``, and as printed in the
    README."""

    params: int
    deploy_params: int
    gflops: float
    deploy_gflops: float
    readme_params_m: float
    readme_gflops: float


@dataclass(frozen=True)
class StudentSpec:
    """One scale. ``input_size`` is (H, W); ``normalize_input`` says whether the official data pipeline applies the
    ImageNet ``Normalize`` (DEIMv2 ViT variants), which :class:`students.detector.Detector` then does itself."""

    name: str
    family: str
    config: str
    input_size: tuple[int, int]
    backbone: str
    backbone_kwargs: dict[str, Any]
    encoder: str
    encoder_kwargs: dict[str, Any]
    decoder: str
    decoder_kwargs: dict[str, Any]
    official: OfficialFigures
    postprocessor_kwargs: dict[str, Any] = field(default_factory=lambda: dict(_POSTPROCESSOR))
    normalize_input: bool = False
    backbone_weights: str | None = None

    def component_kwargs(self, num_classes: int = 80) -> dict[str, dict[str, Any]]:
        """Fresh (deep-copied) constructor kwargs per component; the official classes mutate some list arguments."""
        size = list(self.input_size)
        return {
            "backbone": copy.deepcopy(self.backbone_kwargs),
            "encoder": {**copy.deepcopy(self.encoder_kwargs), "eval_spatial_size": size},
            "decoder": {**copy.deepcopy(self.decoder_kwargs), "num_classes": num_classes, "eval_spatial_size": size},
            "postprocessor": {**copy.deepcopy(self.postprocessor_kwargs), "num_classes": num_classes},
        }


# --------------------------------------------------------------------------------------------------------------
# shared blocks (values common to a family; each scale overrides what its YAML sets)

_DFINE_DECODER = dict(
    num_queries=300,
    num_denoising=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    eval_idx=-1,
    reg_max=32,
    reg_scale=4,
    layer_scale=1,
    cross_attn_method="default",
    query_select_method="default",
    activation="silu",
    mlp_act="silu",
)
_AIFI = dict(use_encoder_idx=[2], num_encoder_layers=1, nhead=8, dropout=0.0, enc_act="gelu", act="silu")
_HGNET = dict(pretrained=False, freeze_at=-1, freeze_norm=False)
_PRESNET = dict(variant="d", num_stages=4, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False, pretrained=False)
_RTDETRV2_DECODER = dict(
    num_queries=300,
    num_denoising=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    eval_idx=-1,
    num_points=[4, 4, 4],
    cross_attn_method="default",
    query_select_method="default",
    query_pos_method="as_reg",
    activation="silu",
    mlp_act="silu",
)
_DEIMV2_ENCODER = dict(version="deim", csp_type="csp2", fuse_op="sum")
_S3 = [8, 16, 32]


def _dfine(**kw) -> dict:
    return {**_DFINE_DECODER, **kw}


_SPECS: list[StudentSpec] = [
    # ---- DEIM on D-FINE (HGNetv2) ----------------------------------------------------------------------------
    StudentSpec(
        name="deim_dfine_n",
        family="deim_dfine",
        config="DEIM:configs/deim_dfine/deim_hgnetv2_n_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="B0", return_idx=[2, 3], use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B0_stage1.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(
            in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128, dim_feedforward=512,
            expansion=0.34, depth_mult=0.5, **{**_AIFI, "use_encoder_idx": [1]},
        ),
        decoder="DFINETransformer",
        decoder_kwargs=_dfine(feat_channels=[128, 128], feat_strides=[16, 32], hidden_dim=128, num_levels=2,
                          num_layers=3, num_points=[6, 6], dim_feedforward=512),
        official=OfficialFigures(3_782_693, 3_753_799, 7.33, 7.31, 4.0, 7.0),
    ),
    StudentSpec(
        name="deim_dfine_s",
        family="deim_dfine",
        config="DEIM:configs/deim_dfine/deim_hgnetv2_s_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="B0", return_idx=[1, 2, 3], use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B0_stage1.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[256, 512, 1024], feat_strides=_S3, hidden_dim=256, dim_feedforward=1024,
                            expansion=0.5, depth_mult=0.34, **_AIFI),
        decoder="DFINETransformer",
        decoder_kwargs=_dfine(feat_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, num_levels=3,
                          num_layers=3, num_points=[3, 6, 3]),
        official=OfficialFigures(10_321_877, 10_237_491, 25.67, 25.5, 10.0, 25.0),
    ),
    StudentSpec(
        name="deim_dfine_m",
        family="deim_dfine",
        config="DEIM:configs/deim_dfine/deim_hgnetv2_m_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="B2", return_idx=[1, 2, 3], use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B2_stage1.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[384, 768, 1536], feat_strides=_S3, hidden_dim=256, dim_feedforward=1024,
                            expansion=1.0, depth_mult=0.67, **_AIFI),
        decoder="DFINETransformer",
        decoder_kwargs=_dfine(feat_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, num_levels=3,
                          num_layers=4, num_points=[3, 6, 3]),
        official=OfficialFigures(19_590_064, 19_248_189, 58.36, 57.03, 19.0, 57.0),
    ),
    StudentSpec(
        name="deim_dfine_l",
        family="deim_dfine",
        config="DEIM:configs/deim_dfine/deim_hgnetv2_l_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="B4", return_idx=[1, 2, 3], freeze_stem_only=True, **_HGNET),
        backbone_weights="PPHGNetV2_B4_stage1.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[512, 1024, 2048], feat_strides=_S3, hidden_dim=256, dim_feedforward=1024,
                            expansion=1.0, depth_mult=1, **_AIFI),
        decoder="DFINETransformer",
        decoder_kwargs=_dfine(feat_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, num_levels=3,
                          num_layers=6, num_points=[3, 6, 3]),
        official=OfficialFigures(31_289_848, 30_769_891, 93.58, 91.6, 31.0, 91.0),
    ),
    StudentSpec(
        name="deim_dfine_x",
        family="deim_dfine",
        config="DEIM:configs/deim_dfine/deim_hgnetv2_x_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="B5", return_idx=[1, 2, 3], freeze_stem_only=True, **_HGNET),
        backbone_weights="PPHGNetV2_B5_stage1.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[512, 1024, 2048], feat_strides=_S3, hidden_dim=384, dim_feedforward=2048,
                            expansion=1.0, depth_mult=1, **_AIFI),
        decoder="DFINETransformer",
        decoder_kwargs=_dfine(feat_channels=[384, 384, 384], feat_strides=_S3, hidden_dim=256, num_levels=3,
                          num_layers=6, num_points=[3, 6, 3], reg_scale=8),
        official=OfficialFigures(62_715_480, 61_695_555, 207.51, 203.08, 62.0, 202.0),
    ),
    # ---- DEIMv2: HGNetv2 + LiteEncoder (Atto/Femto/Pico), HGNetv2 + HybridEncoder (N) ----------------------
    StudentSpec(
        name="deimv2_atto",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_hgnetv2_atto_coco.yml",
        input_size=(320, 320),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="Atto", return_idx=[2], freeze_stem_only=True, use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B0_stage1.pth",
        encoder="LiteEncoder",
        encoder_kwargs=dict(in_channels=[256], feat_strides=[16], hidden_dim=64, expansion=0.34, depth_mult=0.5,
                            act="silu"),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[64, 64], feat_strides=[16, 32], hidden_dim=64, num_levels=2,
                          num_layers=3, num_points=[4, 2], num_queries=100, dim_feedforward=160,
                          share_bbox_head=True, use_gateway=False),
        official=OfficialFigures(508_985, 494_159, 0.76, 0.76, 0.49, 0.8),
    ),
    StudentSpec(
        name="deimv2_femto",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_hgnetv2_femto_coco.yml",
        input_size=(416, 416),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="Femto", return_idx=[2], freeze_stem_only=True, use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B0_stage1.pth",
        encoder="LiteEncoder",
        encoder_kwargs=dict(in_channels=[512], feat_strides=[16], hidden_dim=96, expansion=0.34, depth_mult=0.5,
                            act="silu"),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[96, 96], feat_strides=[16, 32], hidden_dim=96, num_levels=2,
                          num_layers=3, num_points=[4, 2], num_queries=150, dim_feedforward=256,
                          share_bbox_head=True, use_gateway=False),
        official=OfficialFigures(983_945, 962_311, 1.68, 1.67, 1.0, 1.7),
    ),
    StudentSpec(
        name="deimv2_pico",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_hgnetv2_pico_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="Pico", return_idx=[2], freeze_stem_only=True, use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B0_stage1.pth",
        encoder="LiteEncoder",
        encoder_kwargs=dict(in_channels=[512], feat_strides=[16], hidden_dim=112, expansion=0.34, depth_mult=0.5,
                            act="silu"),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[112, 112], feat_strides=[16, 32], hidden_dim=112, num_levels=2,
                          num_layers=3, num_points=[4, 2], num_queries=200, dim_feedforward=320,
                          share_bbox_head=True, use_gateway=False),
        official=OfficialFigures(1_539_539, 1_514_285, 5.16, 5.15, 1.5, 5.2),
    ),
    StudentSpec(
        name="deimv2_n",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_hgnetv2_n_coco.yml",
        input_size=(640, 640),
        backbone="HGNetv2",
        backbone_kwargs=dict(name="B0", return_idx=[2, 3], freeze_stem_only=True, use_lab=True, **_HGNET),
        backbone_weights="PPHGNetV2_B0_stage1.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(
            in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128, dim_feedforward=512, expansion=0.34,
            depth_mult=0.5, **{**_AIFI, "use_encoder_idx": [1]}, version="dfine", csp_type="csp2", fuse_op="sum",
        ),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[128, 128], feat_strides=[16, 32], hidden_dim=128, num_levels=2,
                          num_layers=3, num_points=[6, 6], dim_feedforward=512),
        official=OfficialFigures(3_600_421, 3_571_527, 7.03, 7.02, 3.6, 6.8),
    ),
    # ---- DEIMv2: DINOv3-family ViT + STA (the data pipeline normalises with ImageNet mean/std) -----------------
    StudentSpec(
        name="deimv2_s",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_dinov3_s_coco.yml",
        input_size=(640, 640),
        backbone="DINOv3STAs",
        backbone_kwargs=dict(name="vit_tiny", embed_dim=192, interaction_indexes=[3, 7, 11], num_heads=3),
        backbone_weights="vitt_distill.pt",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[192, 192, 192], feat_strides=_S3, hidden_dim=192, dim_feedforward=512,
                            expansion=0.34, depth_mult=0.67, **_AIFI, **_DEIMV2_ENCODER),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[192, 192, 192], feat_strides=_S3, hidden_dim=192, num_levels=3,
                          num_layers=4, num_points=[3, 6, 3], dim_feedforward=512),
        official=OfficialFigures(9_779_838, 9_707_403, 49.64, 49.55, 9.71, 25.6),
        normalize_input=True,
    ),
    StudentSpec(
        name="deimv2_m",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_dinov3_m_coco.yml",
        input_size=(640, 640),
        backbone="DINOv3STAs",
        backbone_kwargs=dict(name="vit_tinyplus", embed_dim=256, interaction_indexes=[3, 7, 11], num_heads=4),
        backbone_weights="vittplus_distill.pt",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, dim_feedforward=512,
                            expansion=0.67, depth_mult=1, **_AIFI, **_DEIMV2_ENCODER),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, num_levels=3,
                          num_layers=4, num_points=[3, 6, 3], dim_feedforward=512),
        official=OfficialFigures(18_357_750, 18_106_355, 84.98, 84.1, 18.1, 52.2),
        normalize_input=True,
    ),
    StudentSpec(
        name="deimv2_l",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_dinov3_l_coco.yml",
        input_size=(640, 640),
        backbone="DINOv3STAs",
        backbone_kwargs=dict(name="dinov3_vits16", interaction_indexes=[5, 8, 11], finetune=True, conv_inplane=32,
                             hidden_dim=224),
        backbone_weights="dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[224, 224, 224], feat_strides=_S3, hidden_dim=224, dim_feedforward=896,
                            expansion=1.0, depth_mult=1, **_AIFI, **_DEIMV2_ENCODER),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[224, 224, 224], feat_strides=_S3, hidden_dim=224, num_levels=3,
                          num_layers=4, num_points=[3, 6, 3], dim_feedforward=1792),
        official=OfficialFigures(32_551_214, 32_178_043, 146.01, 144.49, 32.2, 96.7),
        normalize_input=True,
    ),
    StudentSpec(
        name="deimv2_x",
        family="deimv2",
        config="DEIMv2:configs/deimv2/deimv2_dinov3_x_coco.yml",
        input_size=(640, 640),
        backbone="DINOv3STAs",
        backbone_kwargs=dict(name="dinov3_vits16plus", interaction_indexes=[5, 8, 11], finetune=True,
                             conv_inplane=64, hidden_dim=256),
        backbone_weights="dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, dim_feedforward=1024,
                            expansion=1.25, depth_mult=1.37, **_AIFI, **_DEIMV2_ENCODER),
        decoder="DEIMTransformer",
        decoder_kwargs=_dfine(feat_channels=[256, 256, 256], feat_strides=_S3, hidden_dim=256, num_levels=3,
                          num_layers=6, num_points=[3, 6, 3], dim_feedforward=2048),
        official=OfficialFigures(51_211_736, 50_260_163, 203.71, 199.6, 50.3, 151.6),
        normalize_input=True,
    ),
]


def _rtdetrv2(name: str, depth: int, cfg: str, in_channels: list[int], hidden: int, ffn: int, expansion: float,
              layers: int, official: OfficialFigures, weights: str, **decoder_kw) -> StudentSpec:
    """The five DEIM-RT-DETRv2 scales differ only in these few values."""
    return StudentSpec(
        name=name,
        family="deim_rtdetrv2",
        config=f"DEIM:configs/deim_rtdetrv2/{cfg}",
        input_size=(640, 640),
        backbone="PResNet",
        backbone_kwargs=dict(depth=depth, **_PRESNET),
        backbone_weights=weights,
        encoder="HybridEncoder",
        encoder_kwargs=dict(in_channels=in_channels, feat_strides=_S3, hidden_dim=hidden, dim_feedforward=ffn,
                            expansion=expansion, depth_mult=1, **_AIFI, version="rt_detrv2"),
        decoder="RTDETRTransformerv2",
        decoder_kwargs={**_RTDETRV2_DECODER, "feat_channels": [hidden] * 3, "feat_strides": _S3, "hidden_dim": 256,
                        "num_levels": 3, "num_layers": layers, **decoder_kw},
        official=official,
    )


_SPECS += [
    _rtdetrv2("deim_rtdetrv2_r18", 18, "deim_r18vd_120e_coco.yml", [128, 256, 512], 256, 1024, 0.5, 3,
              OfficialFigures(20_183_440, 19_979_152, 61.49, 60.5, 20.0, 60.0),
              "ResNet18_vd_pretrained_from_paddle.pth"),
    _rtdetrv2("deim_rtdetrv2_r34", 34, "deim_r34vd_120e_coco.yml", [128, 256, 512], 256, 1024, 0.5, 4,
              OfficialFigures(31_440_644, 31_236_356, 93.59, 92.61, 31.0, 92.0),
              "ResNet34_vd_pretrained_from_paddle.pth"),
    _rtdetrv2("deim_rtdetrv2_r50m", 50, "deim_r50vd_m_60e_coco.yml", [512, 1024, 2048], 256, 1024, 0.5, 3,
              OfficialFigures(33_198_864, 32_994_576, 100.6, 99.61, 33.0, 100.0),
              "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth", eval_idx=2),
    _rtdetrv2("deim_rtdetrv2_r50", 50, "deim_r50vd_60e_coco.yml", [512, 1024, 2048], 256, 1024, 1.0, 6,
              OfficialFigures(42_943_596, 42_144_876, 137.78, 133.84, 42.0, 136.0),
              "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth"),
    _rtdetrv2("deim_rtdetrv2_r101", 101, "deim_r101vd_60e_coco.yml", [512, 1024, 2048], 384, 2048, 1.0, 6,
              OfficialFigures(76_660_716, 74_872_812, 260.57, 251.72, 76.0, 259.0),
              "ResNet101_vd_ssld_pretrained_from_paddle.pth"),
]

STUDENTS: dict[str, StudentSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> StudentSpec:
    """The spec of ``name``; an unknown name fails listing the valid ones."""
    try:
        return STUDENTS[name]
    except KeyError:
        raise UnknownNameError(f"unknown student {name!r}; valid names: {', '.join(STUDENTS)}") from None
