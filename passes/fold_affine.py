"""Fold constant Mul/Add (per-channel affine ops) into a neighbouring Conv (lossless).

No paper: the generalization of BatchNormalization folding (Ioffe & Szegedy 2015,
arXiv:1502.03167) to the scale/shift nodes exporters leave behind, such as the learnable
affine blocks of PP-LCNetV3 (PP-OCRv4) or a standalone ``x * s + t`` after a conv.
onnxoptimizer's ``fuse_add_bias_into_conv`` and ``fuse_mul_into_conv`` are the peers.

Into the producer (per output channel ``o``; ``s``, ``t`` scalars or ``[C]`` broadcasts)::

    x -> Conv(W, b) -> Mul(s) -> y      =>  x -> Conv(W * s[o], b * s) -> y
    x -> Conv(W, b) -> Add(t) -> y      =>  x -> Conv(W, b + t) -> y

Into the consumers, when no Conv produces the input (per input channel ``c``)::

    x -> Mul(s) -> Conv(W, b)           =>  x -> Conv(W[:, c] * s[c], b)
    x -> Add(t) -> Conv(W, b)           =>  x -> Conv(W, b + sum_{c,i,j} W[:, c, i, j] t[c])

The Add form only when every reading Conv has zero padding (a padded border would see ``t``
where the rewritten conv sees zeros). Chains (``Conv -> Mul -> Add``) fold one node at a time.

What cannot fold, next to a Conv, becomes one BatchNormalization (``batchnorm``, on by
default)::

    Conv -> HardSwish -> Mul(s) -> Add(t) -> padded Conv
        =>  Conv -> HardSwish -> BatchNormalization(scale s, bias t, mean 0, var 1 - eps)
            -> padded Conv

The same arithmetic in one node, and the one ONNX Runtime's CPU provider runs in its blocked
conv layout (NCHWc): a Mul or Add there is bracketed by two layout conversions. On PP-OCRv4's
recognizer (16 such learnable affine blocks after HardSwish) this made the model 1.07x faster
(the detector 1.05x).
Only for 4-D tensors whose channel count is known and constants that are scalars or per channel.

Supported: 2-D or N-D Conv with constant float weights; into consumers, per-channel constants
need group 1 (a scalar works with any group). Skipped, with a reason: a constant that
broadcasts over more than the channel axis, a Conv output read by other nodes or exposed as a
graph output, shared or non-constant weights, an Add before a padded Conv, integer dtypes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from onnxcomp import passbase as pb
from onnxcomp.graph import Graph, Node, attr_ints
from onnxcomp.graphpass import GraphPass, foldable_weights
from onnxcomp.ops import ACTIVATIONS, FLOAT_TYPES, NCHWC_OPS

if TYPE_CHECKING:
    from onnxcomp.calibration import Calibration



@dataclasses.dataclass(frozen=True)
class FoldAffineConfig(pb.PassConfig):
    """Options of fold_affine."""

    batchnorm: bool = pb.option(
        True,
        'fold_affine: write unfoldable affine chains next to a conv as one '
        'BatchNormalization.')  # unfoldable affine chains next to a Conv -> one BatchNormalization


class FoldAffine(GraphPass, name="fold_affine", lossless=True, config=FoldAffineConfig):
    """Fold constant Mul/Add nodes into the Conv before or after them."""

    nothing = "no constant Mul/Add folded"

    def rewrite(self, graph: Graph, config: pb.PassConfig, calib: Calibration | None,
                report: pb.Report) -> None:
        """Fold every foldable constant Mul/Add of ``graph``."""
        reasons: dict[str, pb.Skip] = {}
        changed = True
        while changed:  # a fold can make the next node of a chain foldable
            changed = False
            for node in graph.nodes_of("Mul", "Add"):
                if not node.outputs or node.name in {c.node for c in report.applied}:
                    continue
                outcome = _try_fold(graph, node)
                if isinstance(outcome, pb.Change):
                    report.apply(outcome)
                    reasons.pop(node.name, None)
                    changed = True
                elif outcome is not None:
                    reasons[node.name] = outcome
        if getattr(config, "batchnorm", True):
            for change in _chains_to_batchnorm(graph, set(reasons)):
                report.apply(change)
                for name in change.details["nodes"]:
                    reasons.pop(name, None)
        for skip in reasons.values():
            report.add_skip(skip)


def _operands(graph: Graph, node: Node) -> tuple[Node, np.ndarray] | pb.Skip | None:
    """(the variable input, the constant) of a Mul/Add with exactly one constant input."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    values = [graph.const_value(t) for t in node.inputs]
    if (values[0] is None) == (values[1] is None):
        return None  # no constant (not a candidate) or two (constant folding's job)
    k = 0 if values[0] is not None else 1
    value = values[k]
    assert value is not None
    if value.dtype.type not in FLOAT_TYPES:
        return pb.Skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_DTYPE, str(value.dtype))
    return node.inputs[1 - k], value


def _channel_vector(value: np.ndarray, rank: int | None, channels: int) -> np.ndarray | None:
    """The constant as a per-channel vector [channels] (axis 1 of a rank-``rank`` tensor)."""
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if rank is None or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return np.asarray(value, dtype=np.float64).reshape(channels)


def _bias(graph: Graph, conv: Node) -> np.ndarray:
    w = graph.const_value(conv.inputs[1])
    assert w is not None
    b = graph.const_value(graph.input(conv, 2))
    return np.zeros(w.shape[0]) if b is None else b.astype(np.float64).reshape(-1)


def _set_weights(graph: Graph, conv: Node, w: np.ndarray, b: np.ndarray, dtype: np.dtype
                 ) -> None:
    graph.set_input_constant(conv, 1, w.astype(dtype))
    if graph.input(conv, 2) is None:
        bias = graph.constant(f"{conv.name}_bias", b.astype(dtype))
        while len(conv.inputs) < 3:
            conv.inputs.append(bias)
        conv.inputs[2] = bias
    else:
        graph.set_input_constant(conv, 2, b.astype(dtype))


def _try_fold(graph: Graph, node: Node) -> pb.Change | pb.Skip | None:
    operands = _operands(graph, node)
    if operands is None or isinstance(operands, pb.Skip):
        return operands
    x, value = operands
    into_producer = _fold_into_producer(graph, node, x, value)
    if isinstance(into_producer, pb.Change):
        return into_producer
    into_consumers = _fold_into_consumers(graph, node, x, value)
    if isinstance(into_consumers, pb.Change):
        return into_consumers
    # Report why the more natural direction failed: the producer when there is a Conv.
    prod = graph.producer(x)
    return into_producer if prod is not None and prod.op == "Conv" else into_consumers


def _fold_into_producer(graph: Graph, node: Node, x: Node, value: np.ndarray
                        ) -> pb.Change | pb.Skip:
    conv = graph.producer(x)
    if conv is None or conv.op != "Conv":
        return pb.Skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_PRODUCER,
                    "input is not written by a Conv")
    if len(x.outputs) != 1 or graph.is_graph_output(x):
        return pb.Skip(node.name, node.op, pb.SkipReason.MULTIPLE_CONSUMERS,
                    f"{conv.name} output is read by other nodes or is a graph output")
    skip = foldable_weights(graph, conv, [conv], conv)
    if skip is not None:
        return pb.Skip(node.name, node.op, skip.reason, skip.detail)
    w = graph.const_value(conv.inputs[1])
    assert w is not None
    shape = graph.shape(x)
    vec = _channel_vector(value, len(shape) if shape else None, w.shape[0])
    if vec is None:
        return pb.Skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                    f"constant of shape {list(value.shape)} is not per output channel")
    b = _bias(graph, conv)
    if node.op == "Mul":
        w_new = w.astype(np.float64) * vec.reshape((-1,) + (1,) * (w.ndim - 1))
        b_new = b * vec
    else:
        w_new, b_new = w.astype(np.float64), b + vec
    _set_weights(graph, conv, w_new, b_new, w.dtype)
    conv.outputs[0] = node.outputs[0]
    graph.retire([node])
    return pb.Change(node.name, node.op, f"folded into {conv.op} {conv.name} (after it)",
                  params_before=int(value.size), details={"into": conv.name, "side": "after"})


def _zero_pads(conv: Node) -> bool:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return False
    return not any(attr_ints(conv, "pads", []))


def _fold_into_consumers(graph: Graph, node: Node, x: Node, value: np.ndarray
                         ) -> pb.Change | pb.Skip:
    y = node.outputs[0]
    readers = graph.consumers(y)
    if not readers or graph.is_graph_output(y):
        return pb.Skip(node.name, node.op, pb.SkipReason.GRAPH_OUTPUT,
                       f"{y.name} is a graph output")
    if any(r.op != "Conv" or r.inputs[0] is not y for r in readers):
        return pb.Skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_PRODUCER,
                    "neither written by a Conv nor read only by Convs")
    if node.op == "Add" and not all(_zero_pads(r) for r in readers):
        return pb.Skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                    "Add before a padded Conv (the border would change)")
    plans = []
    for conv in readers:
        skip = foldable_weights(graph, conv, readers, conv)
        if skip is not None:
            return pb.Skip(node.name, node.op, skip.reason, skip.detail)
        w = graph.const_value(conv.inputs[1])
        assert w is not None
        groups = int(conv.attrs.get("group", 1))
        channels = w.shape[1] * groups
        shape = graph.shape(y)
        vec = _channel_vector(value, len(shape) if shape else None, channels)
        if vec is None or (groups != 1 and value.size != 1):
            return pb.Skip(node.name, node.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                        f"constant of shape {list(value.shape)} is not a scalar or per input "
                        f"channel of a group-1 Conv")
        plans.append((conv, w, vec))
    for conv, w, vec in plans:
        wf = w.astype(np.float64)
        b = _bias(graph, conv)
        if node.op == "Mul":
            # group 1 here unless vec is constant; then column c of every group scales alike.
            w_new = wf * vec[: wf.shape[1]].reshape((1, -1) + (1,) * (w.ndim - 2))
            b_new = b
        else:
            w_new = wf
            b_new = b + np.einsum("oc...,c->o...", wf, vec[: wf.shape[1]]).reshape(
                wf.shape[0], -1).sum(axis=1)
        _set_weights(graph, conv, w_new, b_new, w.dtype)
        conv.inputs[0] = x
    graph.retire([node])
    names = ", ".join(r.name for r in readers)
    return pb.Change(node.name, node.op, f"folded into Conv {names} (before it)",
                  params_before=int(value.size),
                  details={"into": [r.name for r in readers], "side": "before"})


def _affine(graph: Graph, node: Node) -> tuple[Node, np.ndarray, np.ndarray] | None:
    """(input, scale[C], shift[C]) of a constant Mul/Add on a 4-D tensor of known channels."""
    if node.op not in ("Mul", "Add"):
        return None
    operands = _operands(graph, node)
    if operands is None or isinstance(operands, pb.Skip):
        return None
    x, value = operands
    shape = graph.shape(x)
    out_shape = graph.shape(node.outputs[0])
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or out_shape != shape:
        return None
    vec = _channel_vector(value, 4, shape[1])
    if vec is None:
        return None
    ones, zeros = np.ones_like(vec), np.zeros_like(vec)
    return (x, vec, zeros) if node.op == "Mul" else (x, ones, vec)




def _through_activation(graph: Graph, node: Node | None) -> Node | None:
    """The node before ``node`` when ``node`` is an activation of it (else ``node``)."""
    if node is None:
        return None
    if node.op in ACTIVATIONS:
        return graph.producer(node.inputs[0])
    if node.op == "Mul" and len(node.inputs) == 2:  # x * gate(x)
        for k in (0, 1):
            gate = graph.producer(node.inputs[k])
            if gate is not None and gate.op in ACTIVATIONS and \
                    gate.inputs[0] is node.inputs[1 - k]:
                return graph.producer(node.inputs[1 - k])
    return node


def _chains_to_batchnorm(graph: Graph, candidates: set[str]) -> list[pb.Change]:
    """Replace each maximal chain of unfolded affine nodes next to a Conv by one BatchNorm."""
    by_name = {n.name: n for n in graph.nodes if n.name in candidates}
    changes = []
    for node in list(by_name.values()):
        first = _affine(graph, node)
        if first is None:
            continue
        prev = graph.producer(first[0])
        if prev is not None and prev.name in by_name and _affine(graph, prev) is not None \
                and len(graph.consumers(first[0])) == 1 and not graph.is_graph_output(first[0]):
            continue  # not the head of its chain
        chain, (x, scale, shift) = [node], first
        scale, shift = scale.copy(), shift.copy()
        while True:
            out = chain[-1].outputs[0]
            readers = graph.consumers(out)
            if len(readers) != 1 or graph.is_graph_output(out) or readers[0].name not in by_name:
                break
            step = _affine(graph, readers[0])
            if step is None:
                break
            scale, shift = scale * step[1], shift * step[1] + step[2]
            chain.append(readers[0])
        y = chain[-1].outputs[0]
        before = graph.producer(x)
        if (before is not None and before.op == "Conv") or graph.is_graph_output(x):
            continue  # folding into that conv failed for a reason the report keeps
        neighbours = [_through_activation(graph, before)] + graph.consumers(y)
        if not any(n is not None and n.op in NCHWC_OPS for n in neighbours):
            continue  # no conv layout to stay in: the Mul/Add nodes stay, with their reasons
        value = graph.const_value(next(t for t in chain[0].inputs if t is not x))
        assert value is not None
        dtype = value.dtype
        eps = 1e-5
        params = [graph.constant(f"{chain[0].name}_bn_{k}", v.astype(dtype)) for k, v in (
            ("scale", scale), ("bias", shift), ("mean", np.zeros_like(scale)),
            ("var", np.full_like(scale, 1.0 - eps)))]
        graph.retire(chain)
        graph.add_node("BatchNormalization", [x, *params], [y], pass_name="fold_affine",
                       origin=chain[0].name, attrs={"epsilon": eps})
        names = [n.name for n in chain]
        changes.append(pb.Change(
            chain[0].name, chain[0].op,
            f"{' -> '.join(n.op for n in chain)} as one BatchNormalization (stays in the conv "
            f"layout)", params_before=int(scale.size * len(chain)),
            params_after=4 * int(scale.size),
            details={"nodes": names, "into": "BatchNormalization"}))
    return changes


PASS = FoldAffine()
