"""Linear layers as matrices: ``y = W x + b`` for a Conv (on im2col columns) or a Gemm/MatMul.

A :class:`Layer` is what the decomposition and pruning refits work on: the weight as a matrix,
the conv geometry that turns the input into im2col rows, static shapes at batch 1. A
:class:`Plan` is a replacement chain for one layer whose part before the last stage is linear
in the layer's input (``z = P x``), so the whole chain is ``A P x + b``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxcomp import capture, cost
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph, Node
from onnxcomp.ops import FLOAT_TYPES
from onnxcomp.passbase import Report, Skip, SkipReason

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """2-D convolution geometry with explicit pads (top, left, bottom, right)."""

    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pads: tuple[int, int, int, int]


@dataclasses.dataclass
class Layer:
    """One linear layer a decomposition may replace: ``y = W x + b``."""

    node: Node
    op: str  # Conv | Gemm | MatMul
    weight: np.ndarray  # Conv [O, C, kh, kw]; FC canonical [N, K] (y = W x)
    bias: np.ndarray | None
    geom: ConvGeometry | None
    in_shape: tuple[int, ...]  # without batch: (C, H, W) or (..., K)
    out_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    # Covariance of the layer's input rows (im2col columns) on the calibration data, set
    # before planning; None without data or with fewer than 10 sampled rows per dimension.
    input_cov: np.ndarray | None = None
    # The same from the first and the second half of the calibration samples, to check that a
    # basis fitted on one half still helps on the other (see data_basis_generalizes).
    input_cov_halves: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def name(self) -> str:
        """The node's name."""
        return str(self.node.name)

    @property
    def is_conv(self) -> bool:
        """True for Conv layers."""
        return self.op == "Conv"

    @property
    def matrix(self) -> np.ndarray:
        """``W`` as a matrix [y_dim, x_dim] acting on im2col columns (c, a, b order)."""
        return self.weight.reshape(self.weight.shape[0], -1).astype(np.float64)

    def drop_weight(self) -> None:
        """Free the weight after its last use (shape-only queries keep working)."""
        self.weight = np.broadcast_to(np.zeros((), self.weight.dtype), self.weight.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The shape of :attr:`matrix`, without converting the weight."""
        n = int(self.weight.shape[0])
        return n, int(self.weight.size) // max(n, 1)

    @property
    def bias_vector(self) -> np.ndarray:
        """The bias (zeros when absent)."""
        n = self.weight.shape[0]
        return np.zeros(n) if self.bias is None else self.bias.astype(np.float64).reshape(n)

    @property
    def rows_per_sample(self) -> int:
        """Output positions per sample (pixels for Conv, leading rows for FC)."""
        return int(np.prod(self.out_shape[1:])) if self.is_conv else int(
            np.prod(self.out_shape[:-1]))

    @property
    def macs(self) -> int:
        """MACs per sample."""
        return int(self.rows_per_sample * self.weight.size)

    @property
    def params(self) -> int:
        """Weights + bias."""
        return int(self.weight.size + (0 if self.bias is None else self.bias.size))


def conv_geometry(node: Node, in_hw: Sequence[int], kernel: Sequence[int]) -> ConvGeometry:
    """A conv's geometry with explicit pads, for input spatial size ``in_hw``."""
    strides = [int(v) for v in node.attrs.get("strides", [1, 1])]
    dil = [int(v) for v in node.attrs.get("dilations", [1, 1])]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for ax in range(2):
            out = -(-in_hw[ax] // strides[ax])
            total = max(0, (out - 1) * strides[ax] + (kernel[ax] - 1) * dil[ax] + 1 - in_hw[ax])
            small, big = total // 2, total - total // 2
            pads[ax], pads[ax + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = [int(v) for v in node.attrs.get("pads", [0, 0, 0, 0])]
    return ConvGeometry(int(kernel[0]), int(kernel[1]), strides[0], strides[1], dil[0], dil[1],
                        (pads[0], pads[1], pads[2], pads[3]))


def find_layers(
    graph: Graph,
    shapes: dict[str, tuple[int, ...]],
    ops: Sequence[str],
    report: Report,
    exclude: Sequence[str] = (),
    min_macs: int = 0,
) -> list[Layer]:
    """Candidate layers of the given op types; every other candidate is recorded as skipped."""
    layers: list[Layer] = []
    for node in graph.nodes_of(*ops):
        layer_or_skip = make_layer(graph, shapes, node, exclude, min_macs)
        if isinstance(layer_or_skip, Skip):
            report.add_skip(layer_or_skip)
        else:
            layers.append(layer_or_skip)
    return layers


def own_float_weight(graph: Graph, node: Node, exclude: Sequence[str] = ()
                     ) -> np.ndarray | Skip:
    """``node``'s weight (input 1), or why it cannot be rewritten.

    The weight must be a constant float read by ``node`` alone, and the node not excluded.
    """
    def skip(reason: SkipReason, detail: str) -> Skip:
        return Skip(node.name, node.op, reason, detail)

    if node.name in exclude:
        return skip(SkipReason.USER_EXCLUDED, "--exclude")
    w_t = graph.input(node, 1)
    w = graph.const_value(w_t)
    if w is None or w_t is None:
        return skip(SkipReason.NOT_CONSTANT, "weight is not a constant (already quantized?)")
    if w.dtype.type not in FLOAT_TYPES:
        return skip(SkipReason.UNSUPPORTED_DTYPE, str(w.dtype))
    if not np.isfinite(w).all():
        return skip(SkipReason.UNSUPPORTED_DTYPE,
                    f"{int((~np.isfinite(w)).sum())} of its {w.size} weights are NaN or Inf")
    if graph.is_shared(w_t, [node]):
        return skip(SkipReason.SHARED_WEIGHT, f"{w_t.name} is read by another node")
    return w


def skip_pointwise(layer: Layer, detail: str = "1x1 kernel: use --pass svd") -> Skip | None:
    """A skip for 1x1 convs (methods that need a spatial kernel), else None."""
    g = layer.geom
    assert g is not None
    if g.kh * g.kw == 1:
        return Skip(layer.name, layer.op, SkipReason.UNSUPPORTED_ATTRIBUTE, detail)
    return None


def make_layer(graph: Graph, shapes: dict[str, tuple[int, ...]], node: Node,
               exclude: Sequence[str] = (), min_macs: int = 0) -> Layer | Skip:
    """``node`` as a :class:`Layer` (``y = W x + b``), or why it cannot be one."""

    def skip(reason: SkipReason, detail: str = "") -> Skip:
        return Skip(node.name, node.op, reason, detail)

    weight_skip = own_float_weight(graph, node, exclude)
    if isinstance(weight_skip, Skip):
        return weight_skip
    w = weight_skip
    b_t = graph.input(node, 2)
    b = graph.const_value(b_t) if b_t is not None else None
    if b_t is not None and b is None:
        return skip(SkipReason.NOT_CONSTANT, "bias is not constant")
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    if x_name not in shapes or y_name not in shapes:
        return skip(SkipReason.UNKNOWN_SHAPE, "static shapes unknown (give --calib)")
    in_shape, out_shape = shapes[x_name][1:], shapes[y_name][1:]
    if node.op == "Conv":
        if w.ndim != 4:
            return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, f"{w.ndim - 2}-D conv (2-D only)")
        if int(node.attrs.get("group", 1)) != 1:
            return skip(SkipReason.GROUPED, f"group={node.attrs.get('group')}")
        geom = conv_geometry(node, in_shape[1:], w.shape[2:])
        layer = Layer(node, "Conv", w, b, geom, in_shape, out_shape, w.dtype)
    else:
        fc = _fc_weight(node, w, b)
        if isinstance(fc, str):
            return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, fc)
        wm, bias = fc
        layer = Layer(node, node.op, wm, bias, None, in_shape, out_shape, w.dtype)
    if layer.macs < min_macs:
        return skip(SkipReason.TOO_SMALL, f"{layer.macs} MACs < {min_macs}")
    return layer


def _fc_weight(node: Node, w: np.ndarray, b: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray | None] | str:
    """Canonical [N, K] weight and [N] bias of a Gemm/MatMul, or why it is unsupported."""
    if w.ndim != 2:
        return f"{w.ndim}-D weight"
    if node.op == "MatMul":
        return w.T.copy(), None
    if int(node.attrs.get("transA", 0)):
        return "transA=1"
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    wm = (w if int(node.attrs.get("transB", 0)) else w.T) * alpha
    if b is not None:
        if b.size not in (1, wm.shape[0]):
            return f"bias shape {b.shape} is not per output"
        b = np.broadcast_to(b.reshape(-1) * beta, (wm.shape[0],)).copy()
    return wm.astype(w.dtype), b


@dataclasses.dataclass
class Stage:
    """One linear stage of a replacement chain."""

    kind: str  # "conv" or "matmul"
    weight: np.ndarray  # conv [o, i/g, kh, kw]; matmul canonical [N, K]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    suffix: str = ""


@dataclasses.dataclass
class Plan:
    """A replacement chain for one layer: ``y ~ A (P x) + b`` with stages computing ``P x``.

    ``prefix`` is ``P`` [F, x_dim]; ``last`` is ``A`` [y_dim, F] laid out as the last stage's
    weight; ``last_shape`` is that stage's weight shape (conv) so ``A`` can be written back.
    """

    method: str
    ranks: tuple[int, ...]
    stages: list[Stage]  # the prefix stages; the last stage is built from ``last``
    last_attrs: dict[str, Any]
    last_shape: tuple[int, ...]
    prefix: np.ndarray
    last: np.ndarray
    weight_error: float
    macs: int
    params: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def round_up(value: float, multiple: int) -> int:
    """``value`` rounded to the nearest multiple (at least one multiple)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def xdim(layer: Layer) -> int:
    """Width of the layer's input rows (im2col columns)."""
    return layer.matrix_shape[1]


def batch1_shapes(model: onnx.ModelProto, calib: Calibration) -> dict[str, tuple[int, ...]]:
    """Calibration input shapes with symbolic batch dims set to 1."""
    out = {}
    for inp in model.graph.input:
        if inp.name not in calib.batches[0]:
            continue
        shape = tuple(calib.batches[0][inp.name].shape)
        dims = inp.type.tensor_type.shape.dim
        if shape and dims and not dims[0].HasField("dim_value"):
            shape = (1, *shape[1:])
        out[inp.name] = shape
    return out


def static_shapes(model: onnx.ModelProto, calib: Calibration) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor at batch 1 (input dims from the calibration data)."""
    shaped = cost.shaped_copy(model, batch1_shapes(model, calib))
    out: dict[str, tuple[int, ...]] = {}
    for v in [*shaped.graph.value_info, *shaped.graph.input, *shaped.graph.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[v.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    # Shape inference gives up on some exporters' dynamic reshapes: observe the rest by running
    # one calibration sample.
    missing = [t for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
               for t in (n.input[0], n.output[0]) if t and t not in out]
    if missing:
        first = {k: v[:1] for k, v in calib.batches[0].items()}
        one = Calibration([first], calib.synthetic, calib.source)
        try:
            for batch in capture.iter_capture(model, missing, one):
                out.update({k: tuple(int(d) for d in v.shape) for k, v in batch.items()})
        except Exception as exc:  # unknown shapes stay unknown (skipped)
            log.info("could not observe shapes by running the model: %s", exc)
    return out


def rank_ladder(maximum: int, multiple: int, count: int = 10) -> list[int]:
    """Up to ``count`` ranks, multiples of ``multiple``, spread geometrically up to ``maximum``."""
    if maximum < multiple:
        return [maximum] if maximum >= 1 else []
    steps = sorted({max(multiple, int(round(v / multiple)) * multiple)
                    for v in np.geomspace(multiple, maximum, count)})
    return [s for s in steps if s <= maximum]
