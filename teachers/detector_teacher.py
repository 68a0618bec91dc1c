"""A trained detector as a teacher: big-detector-to-small-detector distillation.

``{checkpoint: RUN_DIR/checkpoints/best.pt, tap: F5}`` loads the EMA student of that run and returns the map at
the tap (stride 32 for F5/P5/S5). Any weights :func:`students.checkpoint.read_weights` takes will do; an official
``.pth`` records no scale, so it needs ``student: NAME`` too. It also gives a teacher with real signal on
machines where foundation-model weights cannot be downloaded.
"""

from __future__ import annotations

import torch

from students.errors import MissingPathError, UserError
from students.load import load_student

from .base import Teacher


class DetectorTeacher(Teacher):
    def __init__(self, checkpoint: str, tap: str = "F5", name: str = "", student: str | None = None, **policy):
        try:
            model = load_student(checkpoint, student=student)
        except MissingPathError as err:
            raise MissingPathError(
                f"{err}. A detector teacher is the best.pt of a run of `distill train`: train that run first "
                "(for the quickstart distillation: `distill train experiments/quickstart.yaml`)"
            ) from err
        if tap not in model.taps:
            raise UserError(f"teacher checkpoint {checkpoint}: unknown tap {tap!r}; valid: {sorted(model.taps)}")
        info = model.taps[tap]
        # A detector sees the student's own [0, 1] images; it normalises inside itself where it needs to.
        super().__init__(
            name or f"{model.name}:{tap}", info.stride, [info.channels], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
            **{"input": "native", **policy},
        )  # fmt: skip
        self.model = model
        self.tap = tap
        self.freeze()

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        # The detector runs on the student's batch as it is (sizes are already multiples of 32).
        if self.input_policy in ("match", "native"):
            return height, width
        return super().input_size(height, width)

    @property
    def stride(self) -> int | None:
        return self.patch_size if self.input_policy in ("match", "native") else None

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [self.model.tap_features(pixels, [self.tap])[self.tap]]
