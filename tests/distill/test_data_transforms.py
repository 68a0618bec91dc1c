"""Box correctness of every augmentation, checked against the pixels: each object is a uniquely coloured
rectangle on black, so after a transform its box must still frame exactly the pixels of its colour."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert

from distill.data.collate import Collator, copy_blend, mixup, multiscale_sizes
from distill.data.config import CopyBlendConfig, DataConfig
from distill.data.epoch import SharedEpoch
from distill.data.mosaic import Mosaic
from distill.data.transforms import TrainTransform, ValTransform, finish, policy_ops, stage_of

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def scene(w, h, boxes):
    """PIL image with box k filled in COLOURS[k], and its target (XYXY pixels)."""
    arr = np.zeros((h, w, 3), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        arr[y0:y1, x0:x1] = COLOURS[k]
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                          canvas_size=(h, w)),
        "labels": torch.arange(len(boxes)),
        "area": torch.tensor([float((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]),
        "image_id": torch.tensor(1),
        "orig_size": torch.tensor([w, h]),
    }
    return Image.fromarray(arr), target


def colour_box(img, colour):
    """XYXY box of the pixels close to ``colour`` in a PIL image or 3 x H x W [0,1] tensor; None if absent."""
    arr = np.asarray(img).astype(np.int32) if isinstance(img, Image.Image) else \
        (img.permute(1, 2, 0).numpy() * 255).round().astype(np.int32)
    mask = (np.abs(arr - np.array(colour)).sum(-1) < 60)
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def assert_boxes_frame_colours(img, boxes_xyxy, labels, tol):
    for box, label in zip(boxes_xyxy.tolist(), labels.tolist()):
        found = colour_box(img, COLOURS[label])
        assert found is not None, f"object {label} has a box but no pixels"
        np.testing.assert_allclose(box, found, atol=tol)


BOXES = [[10, 20, 40, 60], [70, 5, 95, 30]]


def test_flip_moves_boxes_with_pixels():
    img, t = scene(100, 80, BOXES)
    tf = TrainTransform(DataConfig(flip_prob=1.0, img_size=96))
    out_img, out_t = tf.ops["flip"](img, t)
    # independent formula: x -> W - x
    assert out_t["boxes"].tolist() == [[60, 20, 90, 60], [5, 5, 30, 30]]
    assert_boxes_frame_colours(out_img, out_t["boxes"], out_t["labels"], tol=0)


def test_zoom_out_and_iou_crop_keep_boxes_on_their_pixels():
    cfg = DataConfig(zoom_out_prob=1.0, iou_crop_prob=1.0)
    tf = TrainTransform(cfg)
    torch.manual_seed(0)
    seen_crop = 0
    for _ in range(6):
        img, t = scene(100, 80, BOXES)
        zi, zt = tf.ops["zoom_out"](img, t)
        assert zi.size != img.size  # side_range [1, 4], never exactly 1
        assert_boxes_frame_colours(zi, zt["boxes"], zt["labels"], tol=0)
        ci, ct = tf.ops["iou_crop"](zi, zt)
        ci, ct = tf.ops["sanitize"](ci, ct)
        seen_crop += ci.size != zi.size
        # a cropped box is clipped to the crop: it frames the visible part of its rectangle
        assert_boxes_frame_colours(ci, ct["boxes"], ct["labels"], tol=1)
        assert len(ct["area"]) == len(ct["labels"])  # sanitize drops area along with the boxes
    assert seen_crop > 0


def test_mosaic_offsets_are_exact():
    m = Mosaic(output_size=32)
    sizes = [(40, 30), (50, 20), (20, 45), (35, 35)]
    tiles = [scene(w, h, [[2 + k, 3, 12 + k, 13]]) for k, (w, h) in enumerate(sizes)]
    for k, (_, t) in enumerate(tiles):
        t["labels"] = torch.tensor([k])
    canvas, target = m.place(tiles)
    max_w, max_h = 50, 45
    assert canvas.size == (2 * max_w, 2 * max_h)
    offsets = [(0, 0), (max_w, 0), (0, max_h), (max_w, max_h)]
    expected = [[2 + k + ox, 3 + oy, 12 + k + ox, 13 + oy] for k, (ox, oy) in enumerate(offsets)]
    assert target["boxes"].tolist() == expected
    assert target["labels"].tolist() == [0, 1, 2, 3]
    # pasted pixels sit where the boxes say (tile k drew its box in COLOURS[0])
    arr = np.asarray(canvas)
    for x0, y0, x1, y1 in expected:
        assert (arr[y0:y1, x0:x1] == COLOURS[0]).all()


class _FourImages:
    """Minimal dataset for Mosaic: load_item gives a scene with one coloured box."""

    def __len__(self):
        return 4

    def load_item(self, i):
        img, t = scene(64, 48, [[8 + 4 * i, 8, 30 + 4 * i, 30]])
        t["labels"] = torch.tensor([i])
        arr = np.asarray(img).copy()
        arr[np.asarray(img).sum(-1) > 0] = COLOURS[i]
        return Image.fromarray(arr), t


@pytest.mark.parametrize("use_cache", [False, True])
def test_mosaic_boxes_follow_the_affine(use_cache):
    random.seed(1)
    torch.manual_seed(1)
    m = Mosaic(output_size=48, use_cache=use_cache, cache_size=3)
    ds = _FourImages()
    for k in range(4):
        img, t = ds.load_item(k)
        out_img, out_t = m(img, t, ds)
        assert len(out_t["boxes"]) == len(out_t["labels"]) == len(out_t["area"]) >= 1
        # a tile may appear more than once: per colour, the boxes of that label together must contain all
        # its pixels (a box of a rotated rectangle is the envelope of its rotated corners), and each box
        # must hold some of them
        arr = np.asarray(out_img).astype(np.int32)
        for label in set(out_t["labels"].tolist()):
            mask = np.abs(arr - np.array(COLOURS[label])).sum(-1) < 60
            covered = np.zeros_like(mask)
            for box, lab in zip(out_t["boxes"].tolist(), out_t["labels"].tolist()):
                if lab != label:
                    continue
                x0, y0, x1, y1 = int(box[0]) - 1, int(box[1]) - 1, int(np.ceil(box[2])) + 1, int(np.ceil(box[3])) + 1
                covered[max(y0, 0):y1, max(x0, 0):x1] = True
                assert mask[max(y0, 0):y1, max(x0, 0):x1].sum() > 0, "a box without its object"
            assert not (mask & ~covered).any(), f"pixels of object {label} outside its boxes"
    if use_cache:
        assert len(m.cache) == 3  # bounded


def test_finish_gives_normalised_cxcywh():
    img, t = scene(100, 80, BOXES)
    tf = ValTransform(DataConfig(img_size=64))
    x, out = tf(img, t)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    expected = box_convert(torch.tensor(BOXES, dtype=torch.float32), "xyxy", "cxcywh") / torch.tensor(
        [100, 80, 100, 80])
    torch.testing.assert_close(out["boxes"], expected)
    assert out["orig_size"].tolist() == [100, 80]
    xn, _ = finish(img, t, normalize=True)
    # red pixel (1, 0, 0) after ImageNet normalisation
    torch.testing.assert_close(xn[:, 30, 20], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_scheduler_stages_at_boundaries():
    pe = [4, 8, 12]
    assert [stage_of(e, pe) for e in (0, 3, 4, 7, 8, 11, 12, 30)] == \
        ["warmup", "warmup", "mosaic", "mosaic", "plain", "plain", "noaug", "noaug"]
    assert policy_ops(3, pe, True) == []
    assert policy_ops(4, pe, True) == ["mosaic", "photometric"]  # no zoom-out / IoU crop with Mosaic
    assert policy_ops(4, pe, False) == ["photometric", "zoom_out", "iou_crop"]
    assert policy_ops(7, pe, True) == ["mosaic", "photometric"]
    assert policy_ops(8, pe, True) == ["photometric", "zoom_out", "iou_crop"]  # Mosaic window closed
    assert policy_ops(11, pe, False) == ["photometric", "zoom_out", "iou_crop"]
    assert policy_ops(12, pe, False) == []
    cfg = DataConfig(policy_epochs=pe)
    cfg.mosaic.prob = 1.0
    tf = TrainTransform(cfg)
    tail = ["sanitize", "flip", "resize", "sanitize2"]
    assert tf.plan(3) == tail and tf.plan(12) == tail
    assert tf.plan(4)[:2] == ["mosaic", "photometric"] and tf.plan(8)[0] == "photometric"


def test_batch_op_windows_and_mixup_excludes_copyblend():
    cfg = DataConfig()
    cfg.mixup.prob, cfg.mixup.epochs = 1.0, [2, 4]
    cfg.copyblend.prob, cfg.copyblend.epochs = 1.0, [2, 6]
    c = Collator(cfg)
    assert [c.batch_op(e) for e in (1, 2, 3, 4, 5, 6)] == ["none", "mixup", "mixup", "copyblend", "copyblend",
                                                           "none"]


def test_multiscale_sizes_match_spec():
    assert multiscale_sizes(640, 3) == [480, 512, 544, 576, 608, 640, 640, 640, 800, 768, 736, 704, 672]
    cfg = DataConfig(img_size=64, base_size_repeat=2, stop_epoch=3)
    c = Collator(cfg, SharedEpoch(0))
    items = [(torch.rand(3, 64, 64), {"boxes": torch.rand(1, 4), "labels": torch.tensor([0]),
                                      "area": torch.tensor([1.0])}) for _ in range(2)]
    assert c(items)[0].shape[-1] in multiscale_sizes(64, 2)
    c.set_epoch(3)  # stop epoch: single scale
    assert c(items)[0].shape[-2:] == (64, 64)


def _batch():
    a = torch.zeros(3, 40, 50)
    b = torch.ones(3, 40, 50)
    ta = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.25]]), "labels": torch.tensor([1]), "area": torch.tensor([500.0])}
    tb = {"boxes": torch.tensor([[0.3, 0.4, 0.4, 0.5], [0.7, 0.7, 0.1, 0.1]]), "labels": torch.tensor([2, 3]),
          "area": torch.tensor([800.0, 20.0])}
    return torch.stack([a, b]), [ta, tb]


def test_mixup_blends_with_previous_and_concatenates_targets():
    images, targets = _batch()
    out, t = mixup(images, targets, 0.45)
    torch.testing.assert_close(out[0], torch.full((3, 40, 50), 0.55))  # 0.45 * 0 + 0.55 * 1
    torch.testing.assert_close(out[1], torch.full((3, 40, 50), 0.45))
    assert t[0]["labels"].tolist() == [1, 2, 3] and t[1]["labels"].tolist() == [2, 3, 1]
    assert t[0]["boxes"].shape == (3, 4) and t[0]["area"].tolist() == [500.0, 800.0, 20.0]


@pytest.mark.parametrize("mode", ["copy", "blend"])
def test_copy_blend_appends_boxes_inside_the_image(mode):
    random.seed(0)
    images, targets = _batch()
    images = torch.rand_like(images)
    cfg = CopyBlendConfig(area_threshold=100, num_objects=3, with_expand=(mode == "blend"), mode=mode)
    out, t = copy_blend(images, targets, 0.5, cfg)
    pool = {1: (0, 0), 2: (1, 0)}  # label -> (image, index) of the objects with area >= 100
    for i in range(2):
        n0 = len(targets[i]["labels"])
        new_boxes, new_labels = t[i]["boxes"][n0:], t[i]["labels"][n0:]
        assert torch.equal(t[i]["boxes"][:n0], targets[i]["boxes"])  # existing targets untouched
        assert len(new_labels) == 2 and set(new_labels.tolist()) == {1, 2}  # min(3, pool of 2)
        assert len(t[i]["area"]) == len(t[i]["labels"]) == len(t[i]["boxes"])
        xyxy = box_convert(new_boxes, "cxcywh", "xyxy")
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
        for box, label in zip(xyxy, new_labels.tolist()):
            x0, y0, x1, y1 = (box * torch.tensor([50, 40, 50, 40])).round().int().tolist()
            src_i, j = pool[label]
            cx, cy, w, h = targets[src_i]["boxes"][j].tolist()
            sx0, sy0 = int((cx - w / 2) * 50), int((cy - h / 2) * 40)
            assert (x1 - x0, y1 - y0) == (int((cx + w / 2) * 50) - sx0, int((cy + h / 2) * 40) - sy0)  # same size
            src = images[src_i, :, sy0:sy0 + y1 - y0, sx0:sx0 + x1 - x0]
            if mode == "copy" and label == new_labels[-1]:  # the last paste is not covered by another
                torch.testing.assert_close(out[i, :, y0:y1, x0:x1], src)
    if mode == "blend":
        assert not torch.equal(out, images)
