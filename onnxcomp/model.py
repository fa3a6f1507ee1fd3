"""Model I/O: load (external data too), check, shape inference, atomic save.

The input file is only ever read. Saving writes a temporary file in the destination folder and
renames it over the target, so a failure never leaves a half-written output behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.external_data_helper
import onnx.shape_inference
from google.protobuf.message import DecodeError

from onnxcomp import weights
from onnxcomp.errors import InputError

log = logging.getLogger(__name__)

MIN_OPSET = 11
# Protobuf refuses to serialize a message of 2 GiB or more; stay well below.
PROTOBUF_LIMIT = 2**31 - 2**24
QUANTIZED_OPS = frozenset(
    {"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear"}
)


def load(path: str | os.PathLike[str], check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data; raise :class:`InputError` on bad input."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from None
    try:
        if over_limit(model):
            # Too large to hold whole (and to copy): its weights stay in their files.
            weights.adopt(model, p.parent, p)
        elif weights.on_disk(model):
            onnx.load_external_data_for_model(model, str(p.parent))
    except onnx.checker.ValidationError as exc:  # external data missing or misplaced
        raise InputError(f"{p}: its external data cannot be read ({_first_line(exc)})"
                         ) from None
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{p}: its external data cannot be read ({_first_line(exc)})"
                         ) from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p}: not a valid ONNX model (no graph)")
    opset = default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        raise InputError(f"{p}: opset {opset} is not supported (need >= {MIN_OPSET})")
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise InputError(f"{p}: opset {opset} is newer than this ONNX / ONNX Runtime support "
                         f"(<= {newest}): export with a released opset")
    if check:
        check_model(model, path=p)
    _check_initializer_sizes(model, p)
    unknown_negative_dims(model)
    return model


def _check_initializer_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every initializer holds as many values as its shape says (the checker does not look)."""
    import numpy as np

    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            continue
        if t.HasField("raw_data"):
            packed = t.data_type in _FOUR_BIT
            need = (count + 1) // 2 if packed else count * itemsize
            if len(t.raw_data) != need:
                raise InputError(f"{path}: initializer '{t.name}' holds {len(t.raw_data)} bytes; "
                                 f"its shape {list(t.dims)} needs {need}")
            continue
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        have = len(getattr(t, field)) if field else count
        complex_ = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)  # 2 per value
        if (t.data_location != onnx.TensorProto.EXTERNAL and have != count
                and t.data_type not in complex_):
            raise InputError(f"{path}: initializer '{t.name}' holds {have} values; its shape "
                             f"{list(t.dims)} needs {count}")


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
             if hasattr(onnx.TensorProto, n)}


def unknown_negative_dims(model: onnx.ModelProto) -> int:
    """Turn negative ``dim_value``s (some exporters write -1 for "dynamic") into unknown dims.

    ONNX Runtime already treats them as dynamic; clearing them lets the rest of onnxcomp see
    them the same way. Changes ``model`` in place and returns how many dims were cleared.
    """
    cleared = 0
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
                cleared += 1
    if cleared:
        log.debug("cleared %d negative dims (treated as dynamic)", cleared)
    return cleared


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ('' or 'ai.onnx') domain, or None when absent."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialized as one protobuf message."""
    total = 0
    for init in model.graph.initializer:
        total += init.ByteSize()  # not len(raw_data): that would copy the bytes
        if total > PROTOBUF_LIMIT:
            return True
    return False


def over_limit(model: onnx.ModelProto) -> bool:
    """True when the model with its external data would pass the protobuf limit."""
    return weights.external_bytes(model) + model.ByteSize() > PROTOBUF_LIMIT


def check_model(
    model: onnx.ModelProto, path: str | os.PathLike[str] | None = None, full: bool = False
) -> None:
    """Run ``onnx.checker``; raise :class:`InputError` naming the first problem."""
    try:
        if weights.on_disk(model):
            with weights.path_for(model) as target:
                onnx.checker.check_model(str(target), full_check=full)
        elif is_large(model):
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "model.onnx"
                _save_external(model, target)
                onnx.checker.check_model(str(target), full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        where = f"{path}: " if path else ""
        raise InputError(f"{where}invalid ONNX model ({_first_line(exc)})") from None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference with data propagation, tolerating symbolic dims; returns a new model."""
    if is_large(model) and not weights.on_disk(model):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "in.onnx"
            dst = Path(tmp) / "out.onnx"
            _save_external(model, src)
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)
            return onnx.load(str(dst), load_external_data=True)
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        log.warning("strict shape inference failed (%s); retrying without data propagation",
                    _first_line(exc))
        return onnx.shape_inference.infer_shapes(model)


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` atomically; use external data when asked or when the model is too large.

    With external data the tensors go to ``<name>.data`` beside the model; both are written in
    a staging folder beside the target and renamed into place, data first.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target}: is a directory, expected an output file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    use_external = over_limit(model) if external_data is None else external_data
    data_name = target.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged = staging / target.name
        if use_external and weights.on_disk(model):
            weights.write_external(model, staged, data_name)
            os.replace(staging / data_name, target.parent / data_name)
        elif use_external:
            _save_external(model, staged)
            if (staging / data_name).exists():  # not when every tensor is small
                os.replace(staging / data_name, target.parent / data_name)
        else:
            inline = weights.materialize(model) if weights.on_disk(model) else model
            with open(staged, "wb") as fh:
                fh.write(inline.SerializeToString())
        os.replace(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def serialize_for_session(model: onnx.ModelProto, workdir: Path) -> str | bytes:
    """Bytes an onnxruntime session can load, or a path when the model is too large."""
    if not is_large(model):
        return model.SerializeToString()
    target = workdir / "model.onnx"
    _save_external(model, target)
    return str(target)


def _save_external(model: onnx.ModelProto, target: Path) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
        size_threshold=1024,
    )


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of nodes that are already quantized (integer conv/matmul)."""
    return [n.name or n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` (what a pass returns when it changes nothing)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
