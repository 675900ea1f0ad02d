"""JSON that every reader accepts: non-finite floats (NaN, infinity) become null instead of Python's `NaN`."""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(value: Any, indent: int | None = None) -> str:
    """`json.dumps` of `value` with every non-finite float replaced by None (null), strictly valid JSON."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def finite_or_none(value: Any) -> Any:
    """`value` with non-finite floats replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value
