"""Synthetic calibration data: seeded standard-normal inputs when the user gave none.

Refits, ranges and fidelity figures from such data describe random inputs, not the model's
data; every pass that uses it says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxcomp.calibration import (
    Calibration,
    InputSpec,
    check_positive,
    model_inputs,
    resolve_batch_size,
)
from onnxcomp.errors import InputError

log = logging.getLogger(__name__)


def synthetic_calibration(
    model: onnx.ModelProto,
    num_samples: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> Calibration:
    """Random calibration data: standard-normal float inputs, zero integer/bool inputs.

    The leading (batch) dim follows ``batch_size`` unless the model fixes it. Any other
    symbolic dim is looked up in ``dims`` by its name (``dim_param``); an unnamed dynamic dim by
    ``"<input>:<axis>"``.

    Raises:
        InputError: an input has no shape, is a scalar, has a dynamic dim missing from
            ``dims``, or has a type that cannot be synthesized.
        ConfigError: a count or a ``dims`` value is not a positive integer.

    """
    check_positive("num_samples", num_samples)
    check_positive("batch_size", batch_size)
    given = dict(dims or {})
    for key, value in given.items():
        check_positive(f"dims['{key}']", value)
    specs = model_inputs(model)
    shapes = {spec.name: _synthetic_shape(spec, given) for spec in specs}
    for spec in specs:
        if spec.dtype.kind not in "fiub":
            raise InputError(f"input '{spec.name}' is {spec.dtype}; synthetic data can only be "
                             "made for numeric inputs, give --calib data")
    size, fixed = resolve_batch_size(specs, batch_size)
    if fixed and num_samples % size:
        log.info("rounding synthetic samples up from %d to a multiple of the fixed batch %d",
                 num_samples, size)
    rng = np.random.default_rng(seed)
    batches = []
    remaining = math.ceil(num_samples / size) * size if fixed else num_samples
    while remaining > 0:
        count = min(size, remaining)
        batch = {}
        for spec in specs:
            shape = (count, *shapes[spec.name])
            if spec.dtype.kind == "f":
                batch[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
            else:
                batch[spec.name] = np.zeros(shape, spec.dtype)
        batches.append(batch)
        remaining -= count
    calib = Calibration(batches, synthetic=True, source=f"synthetic (standard normal, seed {seed})")
    log.info("calibration: %d synthetic samples in %d batches", calib.num_samples,
             calib.num_batches)
    return calib


def _synthetic_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """The per-sample shape (without the batch dim) of a synthetic input."""
    if spec.dims is None:
        raise InputError(f"input '{spec.name}' has no shape information; give --calib data")
    if not spec.dims:
        raise InputError(f"input '{spec.name}' is a scalar; calibration inputs must be "
                         "batch-first, give --calib data")
    shape = []
    for axis, d in enumerate(spec.dims[1:], start=1):
        if isinstance(d, int):
            shape.append(d)
        elif isinstance(d, str) and d in dims:
            shape.append(int(dims[d]))
        elif f"{spec.name}:{axis}" in dims:
            shape.append(int(dims[f"{spec.name}:{axis}"]))
        elif isinstance(d, str):
            raise InputError(f"input '{spec.name}' has dynamic dim '{d}' (axis {axis}); give "
                             f"--calib data or a value for '{d}' in the synthetic dims")
        else:
            raise InputError(f"input '{spec.name}' has an unnamed dynamic dim (axis {axis}); give "
                             f"--calib data or a value for '{spec.name}:{axis}' in the "
                             "synthetic dims")
    return tuple(shape)


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int = 0
                 ) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs of the given full shapes (``--shape``), in input dtypes.

    Every graph input needs a shape that fits its fixed dims (else an InputError naming it).
    """
    specs = {spec.name: spec for spec in model_inputs(model)}
    unknown = sorted(set(shapes) - set(specs))
    if unknown:
        raise InputError(f"--shape {unknown[0]}: not an input of the model "
                         f"(inputs: {', '.join(specs)})")
    missing = [name for name in specs if name not in shapes]
    if missing:
        raise InputError(f"--shape: no shape for input '{missing[0]}'")
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, spec in specs.items():
        shape = tuple(shapes[name])
        fixed: list[int | str | None] = list(spec.dims or [])
        if len(fixed) != len(shape) or any(isinstance(d, int) and d != s
                                           for d, s in zip(fixed, shape, strict=False)):
            raise InputError(f"--shape {name}={'x'.join(map(str, shape))} does not fit the "
                             f"input's shape {[d if isinstance(d, int) else '?' for d in fixed]}")
        feeds[name] = (rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
                       if spec.dtype.kind == "f" else np.zeros(shape, spec.dtype))
    return feeds
