"""Activation capture: internal tensors of a model on calibration data.

Capture adds internal tensors as extra graph outputs (:func:`with_outputs`) and runs one
onnxruntime session with all graph optimizations off, so no tensor is fused away.
:func:`iter_capture` streams the tensors batch by batch (for statistics such as ``XᵀX`` without
holding every activation); :func:`capture` concatenates them under a memory bound;
:func:`run_model` gives a model's outputs. A layer-by-layer rewrite that needs each layer's
input in the current model uses :class:`onnxcomp.stream.LayerStream` instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Sequence

import numpy as np
import onnx
import onnx.shape_inference
import onnxruntime as ort

from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.calibration import Calibration, batch_len, check_positive, first_line, fmt_bytes
from onnxcomp.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_CAPTURE_BYTES = 2 * 2**30


class CaptureTooLargeError(InputError):
    """Concatenating the captured activations would need more memory than allowed."""


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the named tensors added as extra graph outputs.

    Each new output carries the tensor's type and shape when the model or shape inference knows
    them, and only its name otherwise (onnxruntime accepts untyped outputs). Names that already
    are graph outputs are not added twice.

    Raises:
        InputError: a name is not a graph input, an initializer or a top-level node output.

    """
    wanted = _unique(names)
    graph = model.graph
    known = {out for node in graph.node for out in node.output if out}
    known.update(vi.name for vi in graph.input)
    known.update(t.name for t in graph.initializer)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        listing = ", ".join(f"'{n}'" for n in unknown)
        raise InputError(f"unknown tensor name(s) {listing}: not a graph input, initializer or "
                         "top-level node output")
    existing = {vi.name for vi in graph.output}
    new = [n for n in wanted if n not in existing]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not new:
        return out
    infos = _value_infos(model, new)
    for name in new:
        info = infos.get(name)
        if info is None:
            log.debug("no type known for tensor '%s'; adding an untyped output", name)
            info = onnx.ValueInfoProto(name=name)
        out.graph.output.append(info)
    return out


def _value_infos(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, onnx.ValueInfoProto]:
    """Typed value infos for ``names``: from the model, else from shape inference."""
    found = _typed_infos(model.graph, names)
    missing = [n for n in names if n not in found]
    if missing:
        try:
            inferred = model_io.infer_shapes(model)
        except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:
            log.debug("shape inference failed (%s); capture outputs stay untyped",
                      first_line(exc))
        else:
            found.update(_typed_infos(inferred.graph, missing))
    return found


def _typed_infos(graph: onnx.GraphProto, names: Sequence[str]) -> dict[str, onnx.ValueInfoProto]:
    wanted = set(names)
    found: dict[str, onnx.ValueInfoProto] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.name in wanted and vi.name not in found and vi.type.WhichOneof("value"):
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vi)
            found[vi.name] = copy
    for init in graph.initializer:
        if init.name in wanted and init.name not in found:
            found[init.name] = onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)
            )
    return found


def iter_capture(
    model: onnx.ModelProto,
    names: Sequence[str],
    calib: Calibration,
    provider: str = "cpu",
    threads: int = 1,
) -> Generator[dict[str, np.ndarray], None, None]:
    """Stream the named tensors batch by batch: one dict ``name -> array`` per batch.

    One onnxruntime session with graph optimizations off runs every batch; the model, names and
    calibration inputs are checked before the first batch runs.

    Raises:
        InputError: an unknown tensor name, or calibration data missing a model input.

    """
    wanted = _unique(names)
    session = runtime.make_session(with_outputs(model, wanted), provider, threads, optimize=False)
    feed_names = _feed_names(session, calib)
    return _stream(session, wanted, feed_names, calib)


def _stream(
    session: ort.InferenceSession, names: list[str], feed_names: list[str], calib: Calibration
) -> Generator[dict[str, np.ndarray], None, None]:
    for batch in calib.iter_batches():
        values = session.run(names, {n: batch[n] for n in feed_names})
        yield dict(zip(names, values, strict=True))


def capture(
    model: onnx.ModelProto,
    names: Sequence[str],
    calib: Calibration,
    max_bytes: int = DEFAULT_MAX_CAPTURE_BYTES,
    provider: str = "cpu",
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """The named tensors on every calibration batch, concatenated along the batch axis.

    The size is estimated from the first batch before anything else is kept: when the total
    would exceed ``max_bytes`` a :class:`CaptureTooLargeError` says how much is needed (and is
    raised again if later batches grow past the bound).

    Raises:
        CaptureTooLargeError: the captured tensors would need more than ``max_bytes``.
        InputError: an unknown tensor name, or calibration data missing a model input.

    """
    check_positive("max_bytes", max_bytes)
    wanted = _unique(names)
    total_samples = calib.num_samples
    parts: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    held = 0
    stream = iter_capture(model, wanted, calib, provider, threads)
    try:
        for index, values in enumerate(stream):
            nbytes = sum(int(arr.nbytes) for arr in values.values())
            if index == 0:
                first = max(batch_len(calib.batches[0]), 1)
                estimate = math.ceil(nbytes * total_samples / first)
                if estimate > max_bytes:
                    raise _too_large(wanted, total_samples, estimate, max_bytes)
            held += nbytes
            if held > max_bytes:
                raise _too_large(wanted, total_samples, held, max_bytes, at_least=True)
            for name, arr in values.items():
                parts[name].append(arr)
    finally:
        stream.close()
    result = {}
    for name in wanted:
        chunks = parts.pop(name)  # free the pieces of each tensor as soon as it is joined
        result[name] = np.stack(chunks) if chunks[0].ndim == 0 else np.concatenate(chunks)
    return result


def _too_large(
    names: Sequence[str], samples: int, nbytes: int, max_bytes: int, at_least: bool = False
) -> CaptureTooLargeError:
    need = "at least " if at_least else ""
    return CaptureTooLargeError(
        f"capturing {len(names)} tensor(s) on {samples} samples needs {need}{fmt_bytes(nbytes)} "
        f"({nbytes} bytes), more than max_bytes={max_bytes}; use iter_capture() to stream the "
        "batches, capture fewer tensors, or calibrate on fewer samples"
    )


def run_model(
    model: onnx.ModelProto,
    calib: Calibration,
    provider: str = "cpu",
    threads: int = 1,
    optimize: bool = False,
) -> list[np.ndarray]:
    """The model's own outputs (graph order) on every batch, concatenated along the batch axis."""
    session = runtime.make_session(model, provider, threads, optimize=optimize)
    _feed_names(session, calib)
    return runtime.concat_outputs(runtime.run_batches(session, calib.iter_batches()))


def _feed_names(session: ort.InferenceSession, calib: Calibration) -> list[str]:
    """The session inputs, checked to be present in the calibration batches."""
    needed = [i.name for i in session.get_inputs()]
    available = set(calib.input_names)
    missing = [n for n in needed if n not in available]
    if missing:
        listing = ", ".join(f"'{n}'" for n in missing)
        raise InputError(f"calibration data ({calib.source}) has no values for model input(s) "
                         f"{listing}")
    return needed


def _unique(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise InputError(f"tensor names must be a sequence of names, got the string '{names}'")
    return list(dict.fromkeys(names))
