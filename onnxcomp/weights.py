"""Weights kept on disk, for models too large to hold in memory more than once.

A model whose weights pass the protobuf limit is loaded without its external data. Its
initializers stay references into the files of one store folder per process: the user's data
files are copied in (the originals are only read), and tensors a pass creates are appended to a
file of the store ("spilled"). A model object then holds graph structure only, so the copies a
pipeline makes, shape inference, the checker and ONNX Runtime sessions (which map the data
files) cost little memory; a pass reads one tensor's values at a time, when it needs them.

Only models loaded this way hold store references; everything else stays in memory as before.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxcomp.errors import InputError

# Tensors of at least this many bytes are spilled to the store (the rest stay inline).
SPILL_BYTES = 1 << 20
# Spilled tensors start on this boundary, so ONNX Runtime can map them instead of copying.
ALIGN = 1 << 16
STORE_PREFIX = "onnxcomp-"

_lock = threading.Lock()
_names = itertools.count()
_state: dict[str, Path] = {}
# Spilled tensors go to one file of the store, appended to only under _lock.
_SPILL_FILE = "spilled.bin"


def store_dir() -> Path:
    """The process's store folder (created on first use, removed at exit)."""
    with _lock:
        if "dir" not in _state:
            folder = Path(tempfile.mkdtemp(prefix="onnxcomp-weights-"))
            _state["dir"] = folder
            atexit.register(shutil.rmtree, folder, True)
        return _state["dir"]


def tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every initializer and constant-node tensor, subgraphs included."""
    yield from graph_tensors(model.graph)


def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in ``graph`` and its subgraphs (sparse ones' values and indices)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)


def _initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers of ``graph`` and its subgraphs (what may be spilled)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def is_external(tensor: TensorProto) -> bool:
    """True when the tensor's values live in a file, not in the proto."""
    return tensor.data_location == TensorProto.EXTERNAL


def on_disk(model: onnx.ModelProto) -> bool:
    """True when ``model`` holds store references (it was loaded or spilled as a large model)."""
    return any(is_external(t) for t in tensors(model))


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's external tensors hold (their declared lengths)."""
    total = 0
    for tensor in tensors(model):
        if is_external(tensor):
            length = _info(tensor)[2]
            total += length if length >= 0 else max(_stored_bytes(tensor), 0)
    return total


def _info(tensor: TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor; length -1 when not given."""
    fields = {e.key: e.value for e in tensor.external_data}
    return (fields.get("location", ""), int(fields.get("offset", "0") or 0),
            int(fields.get("length", "-1") or -1))


def _set_info(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def adopt(model: onnx.ModelProto, base_dir: Path, source: Path) -> None:
    """Point ``model``'s external tensors at the store (changes ``model`` in place).

    Each data file is copied into the store under a new name; the original is only read.
    Raise :class:`InputError` when a location leaves the model's folder, a file is missing, or
    a tensor's bytes lie past its file's end.
    """
    store = store_dir()
    base = base_dir.resolve()
    placed: dict[Path, str] = {}
    for tensor in tensors(model):
        if not is_external(tensor):
            continue
        location, offset, length = _info(tensor)
        path = (base / location).resolve()
        if not location or Path(location).is_absolute() or not path.is_relative_to(base):
            raise InputError(f"{source}: external data of '{tensor.name}' is outside the "
                             f"model's folder ({location!r})")
        if not path.is_file():
            raise InputError(f"{source}: its external data cannot be read ('{location}' of "
                             f"'{tensor.name}' is missing)")
        size = path.stat().st_size
        need = _stored_bytes(tensor)
        if length < 0:
            length = need if need >= 0 else size - offset
        if offset < 0 or offset + length > size:
            raise InputError(f"{source}: external data of '{tensor.name}' lies past the end "
                             f"of '{location}' ({offset} + {length} > {size} bytes)")
        if need >= 0 and length != need:
            raise InputError(f"{source}: initializer '{tensor.name}' holds {length} bytes; "
                             f"its shape {list(tensor.dims)} needs {need}")
        if path not in placed:
            name = f"{STORE_PREFIX}{os.getpid()}-{next(_names)}.data"
            # A copy, not a link: onnx.checker refuses linked data files. On Linux the
            # kernel copies (no pass through this process's memory).
            shutil.copyfile(path, store / name)
            placed[path] = name
        _set_info(tensor, placed[path], offset, length)


def _stored_bytes(tensor: TensorProto) -> int:
    """Bytes a tensor's data needs in raw form, or -1 when its dtype has no fixed size."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in _SUB_BYTE:
        return (count * _SUB_BYTE[tensor.data_type] + 7) // 8
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return -1


_SUB_BYTE = {getattr(TensorProto, n): 4 for n in ("INT4", "UINT4", "FLOAT4E2M1")
             if hasattr(TensorProto, n)}
_SUB_BYTE.update({getattr(TensorProto, n): 2 for n in ("INT2", "UINT2")
                  if hasattr(TensorProto, n)})


def read_bytes(tensor: TensorProto) -> bytes:
    """The raw bytes of a store tensor."""
    location, offset, length = _info(tensor)
    with open(store_dir() / location, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def to_array(tensor: TensorProto) -> np.ndarray:
    """A tensor's values as a new array, whether inline or in the store."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    if tensor.data_type == TensorProto.FLOAT or tensor.data_type in _PLAIN:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        location, offset, length = _info(tensor)
        count = length // dtype.itemsize
        values = np.fromfile(store_dir() / location, dtype=dtype, count=count, offset=offset)
        return values.reshape(tuple(tensor.dims))
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = read_bytes(tensor)
    return numpy_helper.to_array(inline)


_PLAIN = {TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.UINT8,
          TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32,
          TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL}


def spill(model: onnx.ModelProto, threshold: int | None = None) -> int:
    """Move ``model``'s inline tensors of ``threshold`` (SPILL_BYTES) bytes or more to the store.

    Changes ``model`` in place (its values do not change) and returns the bytes moved. Call it
    only on a model the caller owns: a pass's fresh result, never a model it was given.
    """
    threshold = SPILL_BYTES if threshold is None else threshold
    moved = 0
    path = store_dir() / _SPILL_FILE
    for tensor in _initializers(model.graph):
        if is_external(tensor) or tensor.ByteSize() < threshold:
            continue
        if not tensor.HasField("raw_data"):
            data = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(data, tensor.name))
        raw = tensor.raw_data
        with _lock, open(path, "ab") as fh:
            fh.seek(0, os.SEEK_END)
            start = _align(fh)
            fh.write(raw)
        tensor.ClearField("raw_data")
        _set_info(tensor, _SPILL_FILE, start, len(raw))
        moved += len(raw)
        del raw
    return moved


@contextlib.contextmanager
def path_for(model: onnx.ModelProto) -> Iterator[Path]:
    """A file of ``model`` (graph only) in the store folder, which its references resolve from.

    The file is removed on exit; the data files stay for the other models that share them.
    """
    path = store_dir() / f"{STORE_PREFIX}{os.getpid()}-{next(_names)}.onnx"
    try:
        with open(path, "wb") as fh:
            fh.write(model.SerializeToString())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def write_external(model: onnx.ModelProto, target: Path, data_name: str,
                   threshold: int | None = None) -> None:
    """Write ``model`` to ``target``, its tensors of ``threshold`` bytes or more in ``data_name``.

    The data file goes beside ``target``; store tensors are copied file to file, never held
    in memory whole.
    """
    threshold = SPILL_BYTES if threshold is None else threshold
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # a graph-only model: its large tensors are references
    with open(target.parent / data_name, "wb") as out:
        for tensor in tensors(copy):
            if is_external(tensor):
                location, offset, length = _info(tensor)
                start = _align(out)
                with open(store_dir() / location, "rb") as src:
                    src.seek(offset)
                    _copy_range(src, out, length)
                _set_info(tensor, data_name, start, length)
            elif tensor.ByteSize() >= threshold:
                if not tensor.HasField("raw_data"):
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor),
                                                            tensor.name))
                start = _align(out)
                out.write(tensor.raw_data)
                length = len(tensor.raw_data)
                tensor.ClearField("raw_data")
                _set_info(tensor, data_name, start, length)
    with open(target, "wb") as fh:
        fh.write(copy.SerializeToString())


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every store tensor's values inline."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in tensors(copy):
        if is_external(tensor):
            raw = read_bytes(tensor)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = raw
    return copy


def _align(out: BinaryIO) -> int:
    """Pad ``out`` to the next ALIGN boundary; return that offset."""
    end = out.tell()
    start = -(-end // ALIGN) * ALIGN
    out.write(b"\0" * (start - end))
    return start


def _copy_range(src: BinaryIO, dst: BinaryIO, length: int, chunk: int = 1 << 24) -> None:
    left = length
    while left > 0:
        block = src.read(min(chunk, left))
        if not block:
            raise OSError("external data ended early")
        dst.write(block)
        left -= len(block)
