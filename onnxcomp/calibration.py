"""Calibration data: an image folder, .npy/.npz, or synthetic inputs.

A :class:`Calibration` is a list of batches; each batch maps every graph input name of the model
to a batch-first array of the input's element type. Sources:

- ``.npz``: one key per graph input (exactly the model's input names), batch-first arrays.
- ``.npy``: one batch-first array, for single-input models only.
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``), read with Pillow in name order,
  resized and normalized as :class:`ImageOptions` says.
- synthetic inputs when the user gave no data: :mod:`onnxcomp.synthetic`.

Every source is checked against the model: the rank and every fixed non-batch dim must match,
and the data is cast to the input's element type (never float data to an integer input). Axis 0
is the batch axis; a fixed batch dim ``k`` in the model means batches of exactly ``k`` samples.

Running models on it (activation capture) is :mod:`onnxcomp.capture`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx.shape_inference

from onnxcomp.errors import ConfigError, InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# One dim of a model input: a fixed size, a symbolic name (dim_param), or unknown.
Dim = int | str | None


# ---------------------------------------------------------------------------- options and data


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How raw images become model inputs.

    Pixels (0..255) are read as RGB (or gray), optionally swapped to BGR, resized to ``size``
    (bilinear), multiplied by ``scale`` and normalized as ``(x - mean) / std`` per channel.
    ``mean`` and ``std`` are in the channel order the model sees (after the BGR swap); a single
    value, or equal values, apply to every channel.

    Attributes:
        size: ``(H, W)``; None takes the model input's fixed spatial dims.
        mean: per-channel mean subtracted after scaling.
        std: per-channel standard deviation divided by after subtracting the mean.
        scale: factor applied to raw 0..255 pixels first.
        layout: the model input's layout, ``"nchw"`` or ``"nhwc"``.
        bgr: feed channels in BGR order instead of RGB.
        grayscale: read images as one gray channel; None decides from the model (1 channel).

    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    layout: Literal["nchw", "nhwc"] = "nchw"
    bgr: bool = False
    grayscale: bool | None = None

    def __post_init__(self) -> None:
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(_is_positive_int(v) for v in size):
                raise ConfigError(f"image size must be two positive integers (H, W), got {size}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        mean = _float_tuple("mean", self.mean)
        std = _float_tuple("std", self.std)
        if any(s <= 0 for s in std):
            raise ConfigError(f"std values must be > 0, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConfigError(f"scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ConfigError(f"scale must be finite and > 0, got {self.scale}")
        if self.layout not in ("nchw", "nhwc"):
            raise ConfigError(f"layout must be 'nchw' or 'nhwc', got {self.layout!r}")
        if not isinstance(self.bgr, bool):
            raise ConfigError(f"bgr must be a bool, got {self.bgr!r}")
        if self.grayscale is not None and not isinstance(self.grayscale, bool):
            raise ConfigError(f"grayscale must be a bool or None, got {self.grayscale!r}")

    @property
    def is_identity(self) -> bool:
        """True when pixels pass through unchanged (scale 1, mean 0, std 1)."""
        return self.scale == 1 and all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)


@dataclasses.dataclass
class Calibration:
    """Calibration batches for one model.

    Attributes:
        batches: each batch maps every graph input name to a batch-first array.
        synthetic: True when the data is random (no user data was given).
        source: a human-readable description of where the data came from.

    """

    batches: list[dict[str, np.ndarray]]
    synthetic: bool
    source: str

    def __post_init__(self) -> None:
        if not self.batches:
            raise InputError(f"calibration set '{self.source}' has no batches")
        names = set(self.batches[0])
        if not names:
            raise InputError(f"calibration set '{self.source}' has no inputs")
        for i, batch in enumerate(self.batches):
            if set(batch) != names:
                raise InputError(
                    f"calibration batch {i} has inputs {sorted(batch)}, batch 0 has {sorted(names)}"
                )
            if any(np.ndim(v) and np.shape(v)[0] == 0 for v in batch.values()):
                raise InputError(f"calibration batch {i} of '{self.source}' is empty")

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str], model: onnx.ModelProto, batch_size: int = 8,
                    limit: int | None = None, **image_options: Any) -> Calibration:
        """An image folder for ``model``; ``image_options`` are :class:`ImageOptions` fields."""
        return load_calibration(path, model, ImageOptions(**image_options), batch_size, limit)

    @property
    def input_names(self) -> list[str]:
        """The input names every batch holds."""
        return list(self.batches[0])

    @property
    def num_batches(self) -> int:
        """How many batches there are."""
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        """Total samples over all batches."""
        return sum(self.batch_sizes())

    def batch_sizes(self) -> list[int]:
        """Samples in each batch."""
        return [batch_len(batch) for batch in self.batches]

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every input in the first batch."""
        return {name: tuple(arr.shape) for name, arr in self.batches[0].items()}

    def iter_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Iterate over the batches in order."""
        yield from self.batches

    def first(self, samples: int) -> Calibration:
        """The first ``samples`` samples (whole batches, the last one cut); self if no fewer."""
        if samples >= self.num_samples:
            return self
        out: list[dict[str, np.ndarray]] = []
        left = samples
        for batch, size in zip(self.batches, self.batch_sizes(), strict=True):
            if left <= 0:
                break
            out.append({k: v[:left] for k, v in batch.items()} if size > left else batch)
            left -= size
        return Calibration(out, self.synthetic, f"{self.source} (first {samples})")

    def all_inputs(self) -> dict[str, np.ndarray]:
        """Every input concatenated over all batches (a new array per input)."""
        return {
            name: np.concatenate([batch[name] for batch in self.batches], axis=0)
            for name in self.input_names
        }


# ---------------------------------------------------------------------------- model inputs


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, element type and dims (None when the rank is unknown)."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...] | None

    @property
    def expected(self) -> str:
        """The expected shape as text, e.g. ``(N, 3, 224, 224)``."""
        if self.dims is None:
            return "(any shape)"
        text = ", ".join("?" if d is None else str(d) for d in self.dims)
        return f"({text},)" if len(self.dims) == 1 else f"({text})"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that need data (initializers listed as inputs are left out)."""
    constants = {t.name for t in model.graph.initializer}
    constants.update(t.values.name for t in model.graph.sparse_initializer)
    specs = []
    for vi in model.graph.input:
        if vi.name in constants:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise InputError(f"model input '{vi.name}' is not a tensor; only tensor inputs "
                             "can be calibrated")
        tensor_type = vi.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            raise InputError(f"model input '{vi.name}' has no element type")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
            raise InputError(f"model input '{vi.name}' has unsupported type {name}") from None
        dims: tuple[Dim, ...] | None = None
        if tensor_type.HasField("shape"):
            dims = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    if not specs:
        raise InputError("model has no graph inputs to calibrate")
    return specs


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    kind = d.WhichOneof("value")
    if kind == "dim_value" and d.dim_value >= 0:
        return int(d.dim_value)
    if kind == "dim_param" and d.dim_param:
        return str(d.dim_param)
    return None


def resolve_batch_size(specs: Sequence[InputSpec], batch_size: int) -> tuple[int, bool]:
    """The batch size to use, and whether the model fixes it (a fixed leading dim)."""
    fixed = {s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], int)}
    if len(fixed) > 1:
        listing = ", ".join(f"'{s.name}' {s.expected}" for s in specs)
        raise InputError(f"model inputs have different fixed batch dims: {listing}")
    if not fixed:
        return batch_size, False
    size = int(fixed.pop())
    if size < 1:
        raise InputError("model inputs have a fixed batch dim of 0")
    if size != batch_size:
        log.info("model fixes the batch dim to %d; using batches of %d (not %d)",
                 size, size, batch_size)
    return size, True


# ---------------------------------------------------------------------------- loading


def load_calibration(
    path: str | os.PathLike[str],
    model: onnx.ModelProto,
    image_options: ImageOptions | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> Calibration:
    """Load calibration data for ``model`` from an .npz, an .npy or a folder of images.

    Args:
        path: an ``.npz`` file (one key per graph input), an ``.npy`` file (single-input models)
            or a folder of images.
        model: the model the data feeds; its graph inputs define names, ranks, dims and dtypes.
        image_options: how to turn images into inputs (defaults to :class:`ImageOptions`).
        batch_size: samples per batch, unless the model fixes its batch dim.
        limit: keep at most this many samples (in file / name order).

    Raises:
        InputError: the path is missing or unreadable, or the data does not fit the model.
        ConfigError: ``batch_size`` or ``limit`` is not a positive integer.

    """
    check_positive("batch_size", batch_size)
    if limit is not None:
        check_positive("limit", limit)
    p = Path(path)
    specs = model_inputs(model)
    if not p.exists():
        raise InputError(f"{p}: no such calibration file or folder")
    if p.is_dir():
        if len(specs) != 1:
            names = ", ".join(f"'{s.name}'" for s in specs)
            raise InputError(f"{p}: an image folder can only feed a single-input model, "
                             f"this model has {len(specs)} inputs ({names})")
        options = image_options or ImageOptions()
        arrays = {specs[0].name: _load_images(p, specs[0], options, limit)}
        kind = "image folder"
    else:
        if image_options is not None:
            log.warning("%s: image options are ignored for array files", p)
        suffix = p.suffix.lower()
        if suffix == ".npz":
            arrays = _load_npz(p, specs, limit)
            kind = "npz"
        elif suffix == ".npy":
            arrays = _load_npy(p, specs, limit)
            kind = "npy"
        else:
            raise InputError(f"{p}: unsupported calibration file type '{p.suffix}' "
                             "(expected .npz, .npy or a folder of images)")
    size, fixed = resolve_batch_size(specs, batch_size)
    batches = _split(arrays, size, fixed, str(p))
    calib = Calibration(batches, synthetic=False, source=f"{p} ({kind})")
    log.info("calibration: %d samples in %d batches from %s", calib.num_samples,
             calib.num_batches, calib.source)
    return calib


def _load_npz(path: Path, specs: Sequence[InputSpec], limit: int | None) -> dict[str, np.ndarray]:
    expected = [s.name for s in specs]
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: not an .npz archive (it holds a single array; "
                         "use the .npy extension)")
    try:
        with data:
            keys = list(data.files)
            missing = [n for n in expected if n not in keys]
            extra = [k for k in keys if k not in expected]
            if missing or extra:
                parts = []
                if missing:
                    parts.append("missing input(s) " + ", ".join(f"'{n}'" for n in missing))
                if extra:
                    parts.append("unexpected key(s) " + ", ".join(f"'{k}'" for k in extra))
                model_names = ", ".join(f"'{n}'" for n in expected)
                raise InputError(f"{path}: {'; '.join(parts)} (model inputs: {model_names})")
            raw = {name: data[name] for name in expected}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    return _validate(raw, specs, limit, str(path))


def _load_npy(path: Path, specs: Sequence[InputSpec], limit: int | None) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        names = ", ".join(f"'{s.name}'" for s in specs)
        raise InputError(f"{path}: a .npy file holds one array but the model has {len(specs)} "
                         f"inputs ({names}); use an .npz with one key per input")
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({first_line(exc)})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        data.close()
        raise InputError(f"{path}: is an .npz archive, not a .npy array (use the .npz extension)")
    return _validate({specs[0].name: data}, specs, limit, str(path))


def _validate(
    raw: Mapping[str, np.ndarray], specs: Sequence[InputSpec], limit: int | None, source: str,
    hint: str = "",
) -> dict[str, np.ndarray]:
    """Check shapes against the model, apply ``limit``, cast to the model's dtypes."""
    for spec in specs:
        _check_shape(spec, raw[spec.name], hint)
    counts = {spec.name: int(raw[spec.name].shape[0]) for spec in specs}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"'{n}' {c}" for n, c in counts.items())
        raise InputError(f"{source}: calibration inputs have different sample counts: {listing}")
    if next(iter(counts.values())) == 0:
        raise InputError(f"{source}: calibration data has no samples")
    arrays = {}
    for spec in specs:
        arr = raw[spec.name]
        if limit is not None:
            arr = arr[:limit]
        # np.array copies memory-mapped data into memory; astype(copy=False) avoids a 2nd copy.
        arr = _cast(spec, np.array(arr) if isinstance(arr, np.memmap) else np.asarray(arr))
        arrays[spec.name] = np.ascontiguousarray(arr)
    return arrays


def _check_shape(spec: InputSpec, arr: np.ndarray, hint: str = "") -> None:
    shape = tuple(int(v) for v in arr.shape)
    mismatch = arr.ndim == 0
    if spec.dims is not None and not mismatch:
        mismatch = arr.ndim != len(spec.dims) or any(
            isinstance(d, int) and shape[axis] != d
            for axis, d in enumerate(spec.dims)
            if axis > 0
        )
    if mismatch:
        raise InputError(f"calibration input '{spec.name}' has shape {shape}, model expects "
                         f"{spec.expected}{hint}")


def _cast(spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    """Cast ``arr`` to the input's dtype, refusing lossy kinds of conversion."""
    src, dst = arr.dtype.kind, spec.dtype.kind
    problem = ""
    if dst == "f":
        if src not in "biuf":
            problem = "cannot be converted to a float input"
    elif dst in "iu":
        if src not in "biu":
            problem = "is not integer data (float data cannot feed an integer input)"
        elif arr.size:
            info = np.iinfo(spec.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                problem = f"has values in [{lo}, {hi}], outside the range of {spec.dtype}"
    elif dst == "b":
        if src not in "biu":
            problem = "is not boolean or integer data"
        elif arr.size and not np.isin(arr, (0, 1)).all():
            problem = "has values other than 0 and 1"
    elif dst in "OUS":
        if src not in "OUS":
            problem = "is not string data"
    else:
        problem = "feeds an input type that calibration does not support"
    if problem:
        raise InputError(f"calibration input '{spec.name}' ({arr.dtype}) {problem}; "
                         f"the model input is {spec.dtype}")
    if dst == "f" and src in "iu" and arr.size and int(arr.max()) > 1:
        log.warning("calibration input '%s' is %s in [%d, %d] for a float input: raw pixels? "
                    "Models usually expect normalised values; preprocess the arrays, or give "
                    "an image folder with --mean/--std/--scale", spec.name, arr.dtype,
                    int(arr.min()), int(arr.max()))
    if dst in "OUS":
        return arr  # onnxruntime takes str and object arrays for string inputs as they are
    return arr.astype(spec.dtype, copy=False)


def _split(
    arrays: Mapping[str, np.ndarray], size: int, fixed: bool, source: str
) -> list[dict[str, np.ndarray]]:
    """Cut batch-first arrays into batches of ``size`` (exactly ``size`` when ``fixed``)."""
    count = int(next(iter(arrays.values())).shape[0])
    if fixed and count % size:
        if count < size:
            raise InputError(f"{source}: the model needs batches of exactly {size} samples, "
                             f"the calibration data has only {count}")
        log.warning("%s: dropping the last %d samples (the model needs batches of exactly %d)",
                    source, count % size, size)
        count -= count % size
    return [
        {name: arr[start:start + size] for name, arr in arrays.items()}
        for start in range(0, count, size)
    ]


# ---------------------------------------------------------------------------- images


def _load_images(
    folder: Path, spec: InputSpec, options: ImageOptions, limit: int | None
) -> np.ndarray:
    """Read, resize and normalize the images of ``folder`` into one batch-first array."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder "
                         "(subfolders are not searched)")
    if limit is not None:
        files = files[:limit]
    dims = spec.dims
    if dims is not None and len(dims) != 4:
        raise InputError(f"{folder}: image calibration needs a 4-D image input, model input "
                         f"'{spec.name}' has shape {spec.expected}")
    c_axis, h_axis, w_axis = (1, 2, 3) if options.layout == "nchw" else (3, 1, 2)
    model_channels = dims[c_axis] if dims is not None else None
    gray = options.grayscale if options.grayscale is not None else model_channels == 1
    channels = 1 if gray else 3
    height, width = _image_size(folder, spec, options, h_axis, w_axis)
    mean = _per_channel("mean", options.mean, channels)
    std = _per_channel("std", options.std, channels)
    integer = spec.dtype.kind in "iu"
    if spec.dtype.kind not in "fiu":
        raise InputError(f"{folder}: image calibration needs a float or integer input, model "
                         f"input '{spec.name}' is {spec.dtype}")
    if integer and not options.is_identity:
        raise InputError(f"{folder}: model input '{spec.name}' is {spec.dtype}, so images are "
                         "fed as raw pixels: use scale=1, mean=0, std=1")

    pixels = np.empty((len(files), height, width, channels), np.uint8 if integer else np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                converted = img.convert("L" if gray else "RGB")
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(resized)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"{file}: not a readable image ({first_line(exc)})") from None
        if gray:
            arr = arr[:, :, None]
        elif options.bgr:
            arr = arr[:, :, ::-1]
        pixels[i] = arr if integer else (arr.astype(np.float32) * options.scale - mean) / std
    if options.layout == "nchw":
        pixels = pixels.transpose(0, 3, 1, 2)
    hint = (f" (images load as {height}x{width} with {channels} channel(s) in "
            f"{options.layout.upper()}; check the image options)")
    log.info("loaded %d images from %s at %dx%d, %d channel(s)", len(files), folder, height,
             width, channels)
    return _validate({spec.name: pixels}, [spec], None, str(folder), hint)[spec.name]


def _image_size(
    folder: Path, spec: InputSpec, options: ImageOptions, h_axis: int, w_axis: int
) -> tuple[int, int]:
    if options.size is not None:
        return options.size
    dims = spec.dims
    if dims is not None:
        height, width = dims[h_axis], dims[w_axis]
        if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
            return height, width
    raise InputError(f"{folder}: model input '{spec.name}' {spec.expected} has no fixed "
                     f"{options.layout.upper()} spatial size; give an image size (H, W)")


def _per_channel(what: str, values: tuple[float, ...], channels: int) -> np.ndarray:
    """``values`` as a (channels,) array: one per channel, one for all, or all equal."""
    if len(values) == channels:
        return np.asarray(values, np.float32)
    if len(set(values)) == 1:
        return np.full(channels, values[0], np.float32)
    raise ConfigError(f"image {what} has {len(values)} values {values} but the images have "
                      f"{channels} channel(s)")


# ---------------------------------------------------------------------------- synthetic


# ---------------------------------------------------------------------------- capture


# ---------------------------------------------------------------------------- small helpers


def batch_len(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch (the first axis of its first array with one)."""
    for arr in batch.values():
        if np.ndim(arr) > 0:
            return int(np.shape(arr)[0])
    return 1


def check_positive(what: str, value: object) -> None:
    """Raise a ConfigError unless ``value`` is a positive int."""
    if not _is_positive_int(value):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)


def _float_tuple(what: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)) or not values:
        raise ConfigError(f"{what} must be a non-empty tuple of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{what} values must be finite numbers, got {values!r}")
        out.append(float(v))
    return tuple(out)


def fmt_bytes(nbytes: int) -> str:
    """``nbytes`` for people (KiB, MiB, GiB)."""
    if nbytes < 1024:
        return f"{nbytes} B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
