"""A teacher spec written as one string, as on a command line: a preset name, a path or hub id, or an inline
YAML/JSON dict such as ``'{timm: resnet10t, weights: random}'``. :func:`teachers.load_teacher` takes the result."""

from __future__ import annotations

from typing import Any

from .presets import PRESETS


def parse_spec(text: str) -> str | dict[str, Any]:
    """A plain name or path as is; an inline dict (text starting with ``{``) parsed as YAML (JSON is YAML)."""
    if text.lstrip().startswith("{"):
        import yaml

        return yaml.safe_load(text)
    return text


def spec_with_input(text: str, policy: str | int) -> dict[str, Any]:
    """``text`` (see :func:`parse_spec`) as a spec dict, with the input policy ``policy`` (match | native | N)
    unless the spec sets one."""
    spec = parse_spec(text)
    spec = dict(spec) if isinstance(spec, dict) else ({"preset": spec} if spec in PRESETS else {"weights": spec})
    spec.setdefault("input", int(policy) if str(policy).isdigit() else policy)
    return spec
