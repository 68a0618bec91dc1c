"""ImageNet normalisation statistics: the one definition every layer uses (students, teachers, data)."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
