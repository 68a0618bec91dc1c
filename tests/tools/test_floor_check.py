"""tools/floor_check.sh tries the floors pyproject.toml declares (it downloads GBs, so it is run by hand, not here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "tools" / "floor_check.sh").read_text()
RAISED = {"numpy", "pyyaml"}  # raised by what the other floors need; the script says why


def _floors() -> dict[str, str]:
    """``{package: floor}`` of pyproject's ``"package>=X"`` lines (read as text: no tomllib on Python 3.10)."""
    return dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text(), re.M))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_script_pins_every_runtime_floor_at_its_release():
    floors, pins = _floors(), dict(re.findall(r"\b([a-z0-9_-]+)==([0-9.]+)", SCRIPT))
    runtime = [p for p in floors if p not in ("pytest", "pytest-xdist", "pytest-timeout", "nbclient", "nbformat",
                                               "ipykernel", "ruff", "tensorboard", "onnx", "onnxruntime")]
    assert set(runtime) - set(pins) == set(), "runtime floors the script does not install"
    for package, pin in pins.items():
        if package not in floors:
            continue
        assert _version(pin) >= _version(floors[package]), (package, pin, floors[package])
        if package not in RAISED:  # the floor's own release: a patch release of it has the same API
            assert _version(pin)[:2] == _version(floors[package])[:2], (package, pin, floors[package])
    assert RAISED <= set(pins) and all(f"{p} " in SCRIPT for p in RAISED)  # each raise is explained there
