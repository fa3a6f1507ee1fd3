"""Result objects as plain JSON-ready dicts (the ``to_dict`` of every dataclass result)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class Record:
    """A dataclass result whose ``to_dict()`` is :func:`as_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return as_dict(self)


def as_dict(obj: Any, *extra: str) -> dict[str, Any]:
    """The dataclass ``obj`` as a dict of plain values, then its ``extra`` attributes.

    Arrays and tuples become lists, numpy scalars Python numbers, and nested results their
    own ``to_dict()``.
    """
    out = {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    out.update({name: plain(getattr(obj, name)) for name in extra})
    return out


def plain(value: Any) -> Any:
    """``value`` with arrays, tuples, numpy scalars and results made JSON-ready."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
