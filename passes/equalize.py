"""Even out the channel ranges between two linear convs (lossless), for per-tensor int8.

Paper: M. Nagel, M. van Baalen, T. Blankevoort, M. Welling, "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019, arXiv:1906.04721 (cross-layer
equalization), applied here to activation ranges measured on the calibration data.

Before::

    x -> Conv A (W_a, b_a) -> t [-> act] -> Conv B (W_b) -> y     (nothing else reads t)

After::

    x -> Conv A (s * W_a, s * b_a) -> t' = s * t [-> act] -> Conv B (W_b / s) -> y

with, per channel c of t, ``s_c = (R / r_c)^alpha``: ``r_c`` the channel's largest |value| on
the calibration data, ``R`` the largest over channels, ``alpha`` 1 when B is depthwise (its
per-channel weight scales absorb ``1 / s_c`` exactly) and 1/2 when B is dense (its input
columns change size). The pair computes the same function; one activation scale per tensor
then wastes less of the int8 grid on channels far smaller than the largest (a CP chain's
middle tensors span orders of magnitude). ``quantize --mode static`` runs it first.

``act`` (only with ``--through-activations``): Relu (positively homogeneous,
``act(s t) = s act(t)``: exact), or a Clip(0, m) such as MobileNet's Relu6. A clip is not
homogeneous (the exact rewrite would clip channel c at ``s_c m``): it stays at m and ``s_c``
is capped at ``m / r_c``, so no calibration value crosses it (exact on the calibration data;
unseen values above ``m / s_c``, at least the channel's calibration maximum, are clipped).
Off by default, for static int8 too: equalized, each channel's int8 range ends near its own
calibration maximum (the tensor's range R clips channel c at ``R / s_c``), so unseen inputs
that run past it are clipped where they had the headroom of the widest channel; measured, it
cost held-out fidelity on EfficientNet-Lite0 and MobileNetV2 (both Relu6), changed nothing on
PP-OCRv4 det and Fashion-MNIST (see benchmarks/results/quantize_static.md).

Supported: Conv -> [act ->] Conv (dense, or depthwise with one input channel per group) with
constant float weights read by those nodes only. Skipped, with a reason: pairs whose channels are
already within a factor 2 of each other, or that never fire on the calibration data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx

from onnxcomp import capture, quant
from onnxcomp import passbase as pb
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph
from onnxcomp.graphpass import GraphPass
from onnxcomp.linear import own_float_weight

# Pairs whose smallest live channel range is above this share of the largest are left alone.
EVEN_ENOUGH = 0.5
MAX_SCALE = 1e4


@dataclasses.dataclass(frozen=True)
class EqualizeConfig(pb.PassConfig):
    """Options of ``equalize``."""

    exclude: tuple[str, ...] = pb.exclude_option()
    through_activations: bool = pb.option(
        False, help="also equalize conv pairs with a Relu or Clip(0, m) between "
                    "(a clip: exact on the calibration data only)")


class Equalize(GraphPass, name="equalize", lossless=True, config=EqualizeConfig,
               calibration=True):
    """The ``equalize`` pass."""

    nothing = ""  # pairs already even are skips, not nothing to do

    def rewrite(self, graph: Graph, config: pb.PassConfig, calib: Calibration | None,
                report: pb.Report) -> None:
        """Equalize every linear conv pair of ``graph``."""
        assert isinstance(config, EqualizeConfig)
        pairs = linear_pairs(graph, config.exclude, config.through_activations)
        if not pairs:
            report.note(pb.NOTHING_TO_DO, "no Conv -> Conv pair with nothing between")
            return
        assert calib is not None  # PassBase gives synthetic inputs without --calib
        amax = _channel_ranges(graph.source, [p.b.inputs[0].name for p in pairs], calib)
        for pair in pairs:
            a, b, depthwise = pair.a, pair.b, pair.depthwise
            r = amax[b.inputs[0].name]
            live = r > 0
            if not live.any():
                report.add_skip(pb.Skip(a.name, a.op, pb.SkipReason.NOT_NEEDED,
                                     f"{a.outputs[0].name} is zero on the calibration data"))
                continue
            if r[live].min() > EVEN_ENOUGH * r.max():
                report.add_skip(pb.Skip(a.name, a.op, pb.SkipReason.NOT_NEEDED,
                                     f"channel ranges within {1 / EVEN_ENOUGH:g}x already"))
                continue
            alpha = 1.0 if depthwise else 0.5
            scale = np.ones_like(r)
            scale[live] = np.clip((r.max() / r[live]) ** alpha, 1.0, MAX_SCALE)
            if pair.clip is not None:  # no calibration value crosses the kept clip
                scale[live] = np.minimum(scale[live], np.maximum(pair.clip / r[live], 1.0))
            _rescale(graph, a, b, depthwise, scale)
            between = f" through {pair.act.op}" if pair.act is not None else ""
            report.apply(pb.Change(
                node=a.name, op_type=a.op, what=f"equalized with {b.name}{between}", error=0.0,
                details={"partner": b.name, "depthwise_partner": depthwise,
                         "through": pair.act.op if pair.act is not None else None,
                         "range_spread_before": round(float(r.max() / r[live].min()), 3),
                         "largest_scale": round(float(scale.max()), 3)}))


PASS = Equalize()


@dataclasses.dataclass(frozen=True)
class Pair:
    """Conv ``a`` -> [``act``] -> Conv ``b``; ``clip`` is the upper bound of a Clip ``act``."""

    a: Any
    act: Any
    b: Any
    depthwise: bool
    clip: float | None = None


def _sole_reader(graph: Graph, t: Any) -> Any:
    """The one node that reads ``t``, or None (several readers, or a graph output)."""
    if len(t.outputs) != 1 or graph.is_graph_output(t):
        return None
    return t.outputs[0]


def linear_pairs(graph: Graph, exclude: tuple[str, ...] = (), through: bool = False
                 ) -> list[Pair]:
    """Conv A whose output only Conv B reads: directly, or (``through``) via one activation.

    A's output channel c can be scaled by s_c if B's input channel c is scaled by 1/s_c:
    the pair computes the same. Decomposed chains (CP, Tucker, SVD) are made of such pairs;
    conv -> Relu / Relu6 -> conv of most CNNs with ``through``.
    """
    pairs = []
    for a in graph.nodes:
        if a.op != "Conv" or isinstance(own_float_weight(graph, a, exclude), pb.Skip):
            continue
        b = _sole_reader(graph, a.outputs[0])
        act, clip = None, None
        if b is not None and b.op != "Conv" and through:  # Relu, or Clip(0, m) such as Relu6
            found = quant.clamping_activation(graph, a.outputs[0])
            act = found[0] if found is not None and b.inputs[0] is a.outputs[0] else None
            clip = found[1] if found is not None and math.isfinite(found[1]) else None
            b = _sole_reader(graph, act.outputs[0]) if act is not None else None
        read = (act if act is not None else a).outputs[0]
        if (b is None or b.op != "Conv" or b.inputs[0] is not read
                or isinstance(own_float_weight(graph, b, exclude), pb.Skip)):
            continue
        if len(a.inputs) > 2 and graph.const_value(graph.input(a, 2)) is None:
            continue  # a computed bias cannot be rescaled
        wa = graph.const_value(graph.input(a, 1))
        wb = graph.const_value(graph.input(b, 1))
        assert wa is not None and wb is not None
        group = int(b.attrs.get("group", 1))
        if group == 1 and wb.shape[1] == wa.shape[0]:
            pairs.append(Pair(a, act, b, False, clip))
        elif group == wa.shape[0] == wb.shape[0] and wb.shape[1] == 1:
            pairs.append(Pair(a, act, b, True, clip))
    return pairs


def _channel_ranges(model: onnx.ModelProto, names: list[str], calib: Calibration
                    ) -> dict[str, np.ndarray]:
    """The largest |value| of every channel (axis 1) of each named tensor."""
    amax: dict[str, np.ndarray] = {}
    for batch in capture.iter_capture(model, names, calib):
        for n, x in batch.items():
            axes = tuple(i for i in range(x.ndim) if i != 1)
            m = np.max(np.abs(x), axis=axes).astype(np.float64)
            amax[n] = np.maximum(amax[n], m) if n in amax else m
    return amax


def _rescale(graph: Graph, a: Any, b: Any, depthwise: bool, scale: np.ndarray) -> None:
    """Scale A's output channels by ``scale`` and B's matching inputs by its inverse."""
    wa = graph.const_value(graph.input(a, 1))
    wb = graph.const_value(graph.input(b, 1))
    assert wa is not None and wb is not None
    shape_a = (-1,) + (1,) * (wa.ndim - 1)
    graph.set_input_constant(a, 1, (wa * scale.reshape(shape_a)).astype(wa.dtype))
    bias = graph.const_value(graph.input(a, 2)) if len(a.inputs) > 2 else None
    if bias is not None:
        graph.set_input_constant(a, 2, (bias * scale).astype(bias.dtype))
    if depthwise:  # B's output channel c reads only input channel c
        inv = (1.0 / scale).reshape(shape_a)
    else:
        inv = (1.0 / scale).reshape((1, -1) + (1,) * (wb.ndim - 2))
    graph.set_input_constant(b, 1, (wb * inv).astype(wb.dtype))
