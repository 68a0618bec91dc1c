"""tools/floor_check.sh tries the floors pyproject.toml declares (it downloads GBs, so it is run by hand, not here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "tools" / "floor_check.sh").read_text()


def _floors() -> dict[str, str]:
    """``{package: floor}`` of pyproject's ``"package>=X"`` lines (read as text: no tomllib on Python 3.10)."""
    return dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text(), re.M))


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("package", ["torch", "torchvision", "transformers"])
def test_the_script_installs_the_declared_floor(package):
    floor = _floors()[package]
    pins = set(re.findall(rf"\b{package}==([0-9.]+)", SCRIPT))
    assert pins, f"tools/floor_check.sh pins no {package}"
    # the floor's own release (a patch release of it is the same API), in every place the script names it
    assert {_release(p) for p in pins} == {_release(floor)}, (package, floor, pins)
