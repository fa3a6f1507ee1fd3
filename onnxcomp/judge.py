"""How a run judges fidelity besides what the outputs' producers say: the user's own terms.

- ``score_threshold``: above it a sigmoid output's value is a confident detection (see
  onnxcomp/outputs.py; default 0.5);
- ``metric``: ``--metric module:function`` (or ``path/to/file.py:function``), called per
  calibration batch as ``function(reference_outputs, candidate_outputs)`` (lists of arrays, in
  the model's output order) and returning a score in [0, 1] (1: as good as the reference);
- ``labels``: ``--labels labels.npy|.json``, one class index per calibration sample, so a
  bound is on real (labelled) accuracy: the drop is the reference's accuracy minus the
  candidate's, read from the first classifier-like output's argmax.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import InputError

SCORE_THRESHOLD = 0.5

Metric = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]


@dataclasses.dataclass(frozen=True)
class Judge:
    """The run's fidelity terms (see the module docstring)."""

    score_threshold: float = SCORE_THRESHOLD
    metric: Metric | None = None
    metric_name: str = ""
    labels: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.score_threshold < 1.0:
            raise InputError(f"--score-threshold must be in (0, 1), got {self.score_threshold}")

    def __getstate__(self) -> dict[str, Any]:
        # A metric loaded from a file is not importable by name in another process: a worker
        # (--jobs, Ray) loads it again from its spec.
        state = dict(self.__dict__)
        if state.get("metric") is not None and state.get("metric_name"):
            state["metric"] = None
            state["_reload"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        reload = state.pop("_reload", False)
        for key, value in state.items():
            object.__setattr__(self, key, value)
        if reload:
            object.__setattr__(self, "metric", load_metric(self.metric_name)[0])

    def first(self, samples: int) -> Judge:
        """The same terms for the first ``samples`` calibration samples."""
        if self.labels is None:
            return self
        return dataclasses.replace(self, labels=self.labels[:samples])

    def score(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
        """The user's metric on one batch, checked: a float in [0, 1]."""
        assert self.metric is not None
        try:
            value = self.metric(list(reference), list(candidate))
        except Exception as exc:
            raise InputError(f"--metric {self.metric_name} raised {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                             ) from exc
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"--metric {self.metric_name} returned {value!r}, not a number in "
                             f"[0, 1]") from None
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise InputError(f"--metric {self.metric_name} returned {number!r}, outside "
                             f"[0, 1]")
        return number


def load_metric(spec: str) -> tuple[Metric, str]:
    """``module:function`` or ``path/to/file.py:function`` -> (the function, its name)."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise InputError(f"--metric must be module:function or file.py:function, got '{spec}'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"--metric {spec}: no file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"--metric {spec}: cannot import {module_name} "
                         f"({type(exc).__name__}: {exc})") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"--metric {spec}: {module_name} has no function {func_name}")
    return func, spec


def load_labels(path: Path) -> np.ndarray:
    """One integer class per sample from ``.npy`` or ``.json`` (a list)."""
    try:
        if Path(path).suffix == ".json":
            raw: Any = json.loads(Path(path).read_text())
        else:
            raw = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"--labels {path}: cannot read ({exc})") from exc
    labels = np.asarray(raw)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"--labels {path}: expected a flat list of integer classes, got "
                         f"shape {labels.shape} of {labels.dtype}")
    return labels.astype(np.int64)
