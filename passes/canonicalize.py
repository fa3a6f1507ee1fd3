"""Canonicalize a graph so later passes see one form (lossless).

No paper: this is the normalization every graph compiler runs first (onnxoptimizer's
``eliminate_identity``, ``eliminate_nop_pad`` and ``fuse_pad_into_conv`` are the peers).

Three rewrites, each exact:

1. ``Constant`` nodes holding a tensor become initializers::

       Constant(value=T) -> t -> Conv        =>   initializer t -> Conv

2. No-op nodes are removed (their readers read the input directly): ``Identity``, inference
   ``Dropout`` whose mask is unused, ``Cast`` to the type it already has, ``Transpose`` with the
   identity permutation, ``Pad`` whose pads are all zero.

3. A zero-valued constant ``Pad`` on the spatial axes only, read by a single ``Conv`` with
   explicit pads, is folded into the Conv's ``pads`` (the sums of both)::

       x -> Pad(pads=[0,0,p1,p2, 0,0,q1,q2]) -> Conv(pads=[a1,a2,b1,b2])
       =>  x -> Conv(pads=[a1+p1, a2+p2, b1+q1, b2+q2])

4. A HardSwish written out elementwise (as exporters do for opsets before 14) becomes one op::

       x -> Add(3) -> Clip(0, 6) -> Mul(x, .) -> Div(6) -> y     (or Mul(1/6); or the
                                                                  Div before the Mul)
       =>  x -> HardSwish -> y                       (opset >= 14)
       =>  x -> HardSigmoid(alpha=1/6, beta=0.5) -> Mul(x, .) -> y   (older opsets)

   Exact up to float rounding. ONNX Runtime runs the four-node form as four passes over
   memory; on PP-OCRv4 rec (28 of them) the fused form measured 1.15x faster for the model.

Skipped, with a reason: a Constant that is a graph output, a node whose removal would rename a
graph output when its input is a graph input, a Pad that is not constant mode / not zero /
pads batch or channel axes / has negative pads / has non-constant pads, a Conv with
``auto_pad`` other than NOTSET.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxcomp import passbase as pb
from onnxcomp.graph import Graph, Node, Tensor
from onnxcomp.graphpass import GraphPass
from onnxcomp.ops import FLOAT_TYPES, NOOP_CANDIDATES

if TYPE_CHECKING:
    from onnxcomp.calibration import Calibration



@dataclasses.dataclass(frozen=True)
class CanonicalizeConfig(pb.PassConfig):
    """canonicalize options."""

    fold_pad: bool = pb.option(True, 'canonicalize: fold zero Pad nodes into the Conv after them.')


class Canonicalize(GraphPass, name="canonicalize", lossless=True, config=CanonicalizeConfig):
    """Constants to initializers, no-op removal, Pad folded into Conv."""

    nothing = "nothing to canonicalize"

    def rewrite(self, graph: Graph, config: pb.PassConfig, calib: Calibration | None,
                report: pb.Report) -> None:
        """Canonicalize ``graph``."""
        assert isinstance(config, CanonicalizeConfig)
        for node in graph.nodes_of("Constant"):
            self._constant(graph, node, report)
        for node in graph.nodes_of(*sorted(NOOP_CANDIDATES)):
            if not node.outputs:  # retired earlier in this loop
                continue
            if _is_noop(graph, node):
                skip = _check_bypass(graph, node)
                if skip is not None:
                    report.add_skip(skip)
                    continue
                graph.bypass(node)
                report.apply(pb.Change(node.name, node.op, "removed no-op"))
            elif node.op == "Pad":
                skip = _check_pad_fold(graph, node) if config.fold_pad else pb.Skip(
                    node.name, node.op, pb.SkipReason.USER_EXCLUDED, "--no-fold-pad")
                if skip is not None:
                    report.add_skip(skip)
                    continue
                conv = _fold_pad(graph, node)
                report.apply(pb.Change(node.name, node.op, f"folded into Conv {conv.name} pads"))
            elif node.op in ("Identity", "Dropout"):
                report.skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                            "Dropout with its mask output used or in training mode")
        for clip in graph.nodes_of("Clip"):
            match = _hardswish(graph, clip)
            if match is not None:
                report.apply(_fuse_hardswish(graph, *match))

    @staticmethod
    def _constant(graph: Graph, node: Node, report: pb.Report) -> None:
        out = node.outputs[0]
        value = graph.const_value(out)
        if value is None:
            report.skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                        "sparse or non-tensor Constant")
        elif graph.is_graph_output(out):
            report.skip(node.name, node.op, pb.SkipReason.GRAPH_OUTPUT, f"{out.name} is an output")
        else:
            graph.replace_with_constant(out, value)
            report.apply(pb.Change(node.name, node.op, "Constant node -> initializer",
                                params_before=int(value.size), params_after=int(value.size)))


def _is_noop(graph: Graph, node: Node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        mask_used = len(node.outputs) > 1 and (
            bool(node.outputs[1].outputs) or graph.is_graph_output(node.outputs[1]))
        training = graph.input(node, 2)
        training_on = training is not None and bool(
            np.any(graph.const_value(training)) if graph.const_value(training) is not None
            else True)
        return not mask_used and not training_on
    if node.op == "Cast":
        src = node.inputs[0].dtype
        if src is None:
            return False
        target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
        return np.dtype(src) == np.dtype(target)
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if node.op == "Pad":
        pads = _pad_amounts(graph, node)
        return pads is not None and not np.any(pads)
    return False


def _check_bypass(graph: Graph, node: Node) -> pb.Skip | None:
    out = node.outputs[0]
    src = node.inputs[0]
    if graph.is_graph_output(out):
        prod = graph.producer(src)
        if prod is None or graph.is_graph_output(src) or len(src.outputs) != 1:
            return pb.Skip(node.name, node.op, pb.SkipReason.GRAPH_OUTPUT,
                        "removing it would rename a graph output")
    return None


def _pad_amounts(graph: Graph, node: Node) -> np.ndarray | None:
    """The full [begin..., end...] pads of a Pad node over all axes, or None if unknown."""
    if "pads" in node.attrs:  # opset < 11
        return np.asarray(node.attrs["pads"], dtype=np.int64)
    pads = graph.const_value(graph.input(node, 1))
    if pads is None:
        return None
    pads = pads.astype(np.int64).reshape(-1)
    axes_t = graph.input(node, 3)
    if axes_t is None:
        return pads
    axes = graph.const_value(axes_t)
    shape = graph.shape(node.inputs[0])
    if axes is None or shape is None:
        return None
    rank = len(shape)
    full = np.zeros(2 * rank, dtype=np.int64)
    k = len(axes)
    for i, value in enumerate(axes.astype(np.int64).reshape(-1)):
        ax = int(value) % rank
        full[ax] = pads[i]
        full[rank + ax] = pads[k + i]
    return full


def _check_pad_fold(graph: Graph, pad: Node) -> pb.Skip | None:
    def skip(reason: pb.SkipReason, detail: str) -> pb.Skip:
        return pb.Skip(pad.name, pad.op, reason, detail)

    mode = pad.attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        return skip(pb.SkipReason.UNSUPPORTED_ATTRIBUTE, f"mode={mode}")
    pads = _pad_amounts(graph, pad)
    if pads is None:
        return skip(pb.SkipReason.NOT_CONSTANT, "pads are not constant")
    value_t = graph.input(pad, 2)
    value = float(pad.attrs.get("value", 0.0))
    if value_t is not None:
        v = graph.const_value(value_t)
        if v is None:
            return skip(pb.SkipReason.NOT_CONSTANT, "pad value is not constant")
        value = float(np.asarray(v).reshape(-1)[0]) if v.size else 0.0
    if value != 0.0:
        return skip(pb.SkipReason.UNSUPPORTED_ATTRIBUTE, f"pad value {value} != 0")
    rank = len(pads) // 2
    if np.any(pads < 0):
        return skip(pb.SkipReason.UNSUPPORTED_ATTRIBUTE, "negative pads (crop)")
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return skip(pb.SkipReason.UNSUPPORTED_ATTRIBUTE, "pads the batch or channel axis")
    out = pad.outputs[0]
    if graph.is_graph_output(out):
        return skip(pb.SkipReason.GRAPH_OUTPUT, f"{out.name} is a graph output")
    readers = graph.consumers(out)
    if len(readers) != 1:
        return skip(pb.SkipReason.MULTIPLE_CONSUMERS, f"read by {len(readers)} nodes")
    conv = readers[0]
    if conv.op != "Conv" or conv.inputs[0] is not out:
        return skip(pb.SkipReason.UNSUPPORTED_PRODUCER, f"read by {conv.op}, not a Conv's data")
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad != "NOTSET":
        return skip(pb.SkipReason.UNSUPPORTED_ATTRIBUTE, f"Conv auto_pad={auto_pad}")
    return None


def _fold_pad(graph: Graph, pad: Node) -> Node:
    pads = _pad_amounts(graph, pad)
    assert pads is not None
    conv = graph.consumers(pad.outputs[0])[0]
    rank = len(pads) // 2
    spatial = rank - 2
    conv_pads = conv.attrs.get("pads") or [0] * (2 * spatial)
    new = [int(conv_pads[i]) + int(pads[2 + i]) for i in range(spatial)] + [
        int(conv_pads[spatial + i]) + int(pads[rank + 2 + i]) for i in range(spatial)
    ]
    conv.attrs["pads"] = new
    conv.inputs[0] = pad.inputs[0]
    graph.retire([pad])
    return conv


def _scalar(graph: Graph, node: Node, var: Tensor) -> float | None:
    """The scalar constant operand of a binary node whose other operand is ``var``."""
    if len(node.inputs) != 2 or not any(t is var for t in node.inputs):
        return None
    other = node.inputs[1] if node.inputs[0] is var else node.inputs[0]
    if other is var:
        return None
    value = graph.const_value(other)
    if value is None or value.size != 1 or value.dtype.type not in FLOAT_TYPES:
        return None
    return float(value.reshape(-1)[0])


def _only_reader(graph: Graph, tensor: Tensor) -> Node | None:
    readers = graph.consumers(tensor)
    if len(readers) != 1 or graph.is_graph_output(tensor):
        return None
    return readers[0]


def _clip_bounds(graph: Graph, clip: Node) -> tuple[float, float] | None:
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        return float(clip.attrs.get("min", -np.inf)), float(clip.attrs.get("max", np.inf))
    bounds = []
    for i in (1, 2):
        t = graph.input(clip, i)
        value = None if t is None else graph.const_value(t)
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(-1)[0]))
    return bounds[0], bounds[1]


def _is_sixth(graph: Graph, node: Node, var: Tensor) -> bool:
    """True for ``var / 6`` or ``var * (1/6)``."""
    k = _scalar(graph, node, var)
    if k is None:
        return False
    if node.op == "Div":
        return node.inputs[0] is var and k == 6.0
    return node.op == "Mul" and abs(k - 1.0 / 6.0) < 1e-7


def _hardswish(graph: Graph, clip: Node) -> tuple[Tensor, list[Node]] | None:
    """(x, the pattern's nodes, last one last) when ``clip`` is the middle of x*relu6(x+3)/6."""
    if _clip_bounds(graph, clip) != (0.0, 6.0) or not clip.outputs:
        return None
    add = graph.producer(clip.inputs[0])
    if add is None or add.op != "Add" or len(graph.consumers(clip.inputs[0])) != 1:
        return None
    if graph.is_graph_output(clip.inputs[0]):
        return None
    x = next((t for t in add.inputs if graph.const_value(t) is None), None)
    if x is None or _scalar(graph, add, x) != 3.0:
        return None
    gated: Tensor = clip.outputs[0]
    nxt = _only_reader(graph, gated)
    if nxt is None or not nxt.outputs:
        return None
    if nxt.op == "Mul" and _scalar(graph, nxt, x) is None and any(t is x for t in nxt.inputs):
        last = _only_reader(graph, nxt.outputs[0])  # x * relu6(x + 3), then / 6
        if last is not None and _is_sixth(graph, last, nxt.outputs[0]):
            return x, [add, clip, nxt, last]
    elif _is_sixth(graph, nxt, gated):
        last = _only_reader(graph, nxt.outputs[0])  # relu6(x + 3) / 6, then * x
        if (last is not None and last.op == "Mul" and len(last.inputs) == 2
                and any(t is x for t in last.inputs)
                and any(t is nxt.outputs[0] for t in last.inputs)):
            return x, [add, clip, nxt, last]
    return None


def _fuse_hardswish(graph: Graph, x: Tensor, nodes: list[Node]) -> pb.Change:
    last = nodes[-1]
    y = last.outputs[0]
    origin = last.name
    graph.retire(nodes)
    if graph.opset >= 14:
        graph.add_node("HardSwish", [x], [y], pass_name="canonicalize", origin=origin)
        what = "x*Clip(x+3,0,6)/6 -> HardSwish"
    else:
        gate = graph.variable(f"{origin}_gate", dtype=x.dtype, shape=x.shape)
        graph.add_node("HardSigmoid", [x], [gate], pass_name="canonicalize", origin=origin,
                       attrs={"alpha": 1.0 / 6.0, "beta": 0.5}, suffix="gate")
        graph.add_node("Mul", [x, gate], [y], pass_name="canonicalize", origin=origin)
        what = "x*Clip(x+3,0,6)/6 -> x*HardSigmoid(x) (opset < 14)"
    return pb.Change(origin, "HardSwish", what, details={"nodes": [n.name for n in nodes]})


PASS = Canonicalize()
