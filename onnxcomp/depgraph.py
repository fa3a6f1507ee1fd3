"""Channel-coupling groups on an ONNX graph (after Torch-Pruning's DepGraph, Fang et al. 2023).

Every tensor's channel axis (axis 1: NCHW activations, ``[N, features]`` matrices) is described
by a *layout*: a list of segments ``(space, length)``. A *space* is a set of channels that must
be pruned together: a Conv/Gemm/MatMul creates one for its output channels; BatchNormalization,
activations, pooling, depthwise convs and per-channel constants pass the input's layout
through; Add/Sub/Mul/Div/Max/Min merge the spaces of their operands (residual connections);
Concat concatenates layouts (offsets); Flatten/Reshape to ``[N, C*H*W]`` keeps the layout with a
``multiplier`` (each channel becomes H*W consecutive features, Gemm/MatMul consumers slice them
by stride). Anything else reading a tensor (an unknown op, a graph output, a channel-axis
Split/Slice/Transpose/Softmax, a grouped conv) *blocks* the spaces it reads, with the reason;
graph inputs are blocked spaces. Merged spaces form a :class:`Group`.

:func:`apply` prunes any number of groups at once: given the channels to keep per group, every
tensor's kept channel indices follow from its layout, and every node slices its parameters
(weights rows/columns, biases, BN statistics, per-channel constants, depthwise ``group``,
Reshape targets) accordingly. Build a new :class:`DepGraph` after pruning: indices go stale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxcomp.graph import Graph, Node
from onnxcomp.ops import BINARY, PER_CHANNEL_PARAMS, UNARY


@dataclasses.dataclass
class Layout:
    """The channel axis of one tensor: segments ``(space, length)`` and a feature multiplier."""

    segments: list[tuple[int, int]]
    multiplier: int = 1

    @property
    def channels(self) -> int:
        """Number of channels (not features)."""
        return sum(n for _, n in self.segments)


@dataclasses.dataclass
class Group:
    """Channels that must be pruned together."""

    id: int
    size: int
    producers: list[str]  # names of Conv/ConvTranspose/Gemm/MatMul writing these channels
    blocked: list[str]  # reasons it cannot be pruned (empty: prunable)
    spaces: list[int]

    @property
    def prunable(self) -> bool:
        """True when nothing blocks the group and some node produces it."""
        return not self.blocked and bool(self.producers)


class DepGraph:
    """Channel layouts of every tensor of ``graph`` and the coupling groups."""

    def __init__(self, graph: Graph, ignore: Sequence[str] = ()) -> None:
        self.graph = graph
        self.layouts: dict[str, Layout] = {}
        self._parent: list[int] = []
        self._size: list[int] = []
        self._blocked: dict[int, list[str]] = {}
        self._producers: dict[int, list[str]] = {}
        self._ignore = set(ignore)
        for t in graph.gs.inputs:
            n = _channels(graph, t)
            if n is not None:
                s = self._new(n)
                self._block(s, f"graph input '{t.name}'")
                self.layouts[t.name] = Layout([(s, n)])
        for node in graph.nodes:
            self._visit(node)
        for t in graph.gs.outputs:
            lay = self.layouts.get(t.name)
            if lay is not None:
                for s, _ in lay.segments:
                    self._block(s, f"graph output '{t.name}'")
        self.groups = self._groups()

    # ------------------------------------------------------------------ union-find
    def _new(self, size: int) -> int:
        self._parent.append(len(self._parent))
        self._size.append(size)
        return len(self._parent) - 1

    def find(self, s: int) -> int:
        """The representative space of ``s``."""
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra

    def _block(self, s: int, reason: str) -> None:
        self._blocked.setdefault(s, []).append(reason)

    def _block_layout(self, lay: Layout | None, reason: str) -> None:
        if lay is not None:
            for s, _ in lay.segments:
                self._block(s, reason)

    def _opaque(self, node: Node, reason: str) -> None:
        """Block what ``node`` reads; its outputs get fresh blocked spaces."""
        for t in node.inputs:
            self._block_layout(self.layouts.get(t.name), f"{node.op} '{node.name}': {reason}")
        for t in node.outputs:
            n = _channels(self.graph, t)
            if n is not None:
                s = self._new(n)
                self._block(s, f"written by {node.op} '{node.name}'")
                self.layouts[t.name] = Layout([(s, n)])

    # ------------------------------------------------------------------ propagation
    def _visit(self, node: Node) -> None:
        g = self.graph
        ins = [self.layouts.get(t.name) for t in node.inputs]
        lay0 = ins[0] if ins else None
        if node.name in self._ignore:
            self._opaque(node, "ignored by the user")
            return
        op = node.op
        if all(lay is None for lay in ins):
            # Constants and shape computations have no channels; anything else that reads
            # tensors of unknown layout (e.g. an NHWC input's Transpose) starts blocked ones.
            if any(g.const_value(t) is None and not _is_shape_like(g, t) for t in node.inputs):
                self._opaque(node, "reads tensors of unknown channel layout")
            return
        if op == "Conv":
            self._conv(node)
        elif op == "ConvTranspose":
            self._producer_consumer(node, weight_in_axis=0, weight_out_axis=1)
        elif op in ("Gemm", "MatMul"):
            self._matrix(node)
        elif op in UNARY or op in PER_CHANNEL_PARAMS or op == "PRelu":
            if op in ("Pad",):
                pass
            self._through(node, lay0)
        elif op in ("Resize", "Upsample"):
            self._through(node, lay0)
        elif op == "Pad":
            pads = g.const_value(g.input(node, 1))
            rank = len(g.shape(node.inputs[0]) or ())
            if pads is None or rank < 2 or pads[1] != 0 or pads[rank + 1] != 0:
                self._opaque(node, "pads the channel axis (or pads unknown)")
            else:
                self._through(node, lay0)
        elif op in BINARY:
            self._binary(node, ins)
        elif op == "Concat":
            self._concat(node, ins)
        elif op in ("Flatten", "Reshape"):
            self._flatten(node, lay0)
        else:
            self._opaque(node, "does not pass channels through")

    def _through(self, node: Node, lay: Layout | None) -> None:
        if lay is None:
            self._opaque(node, "input layout unknown")
            return
        out = node.outputs[0]
        n = _channels(self.graph, out)
        if n is not None and n != lay.channels:
            self._opaque(node, "changes the channel count")
            return
        self.layouts[out.name] = Layout(list(lay.segments), lay.multiplier)

    def _produce(self, node: Node, out_channels: int) -> None:
        s = self._new(out_channels)
        self._producers.setdefault(s, []).append(node.name)
        self.layouts[node.outputs[0].name] = Layout([(s, out_channels)])

    def _weight_ok(self, node: Node, index: int) -> bool:
        g = self.graph
        w = g.input(node, index)
        if g.const_value(w) is None:
            self._opaque(node, "weight is not a constant")
            return False
        assert w is not None
        if len(w.outputs) > 1:
            self._opaque(node, "weight is shared with another node")
            return False
        return True

    def _conv(self, node: Node) -> None:
        g = self.graph
        w = g.const_value(g.input(node, 1))
        lay = self.layouts.get(node.inputs[0].name)
        group = int(node.attrs.get("group", 1))
        if w is None or lay is None or not self._weight_ok(node, 1):
            if w is None or lay is None:
                self._opaque(node, "weight is not a constant")
            return
        if group == 1:
            self._produce(node, int(w.shape[0]))
            return
        if group == lay.channels and w.shape[0] == group and w.shape[1] == 1:
            self._through(node, lay)  # depthwise: one filter per channel
            return
        self._opaque(node, f"grouped conv (group={group})")

    def _producer_consumer(self, node: Node, weight_in_axis: int, weight_out_axis: int) -> None:
        g = self.graph
        w = g.const_value(g.input(node, 1))
        if w is None or int(node.attrs.get("group", 1)) != 1:
            self._opaque(node, "weight is not a constant or the op is grouped")
            return
        if not self._weight_ok(node, 1):
            return
        self._produce(node, int(w.shape[weight_out_axis]))

    def _matrix(self, node: Node) -> None:
        g = self.graph
        lay = self.layouts.get(node.inputs[0].name)
        w = g.const_value(g.input(node, 1))
        shape = g.shape(node.inputs[0])
        if (lay is None or w is None or w.ndim != 2 or shape is None or len(shape) != 2
                or node.attrs.get("transA", 0)):
            self._opaque(node, "not a 2-D input times a constant 2-D weight")
            return
        if not self._weight_ok(node, 1):
            return
        trans_b = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        k = w.shape[1] if trans_b else w.shape[0]
        if k != lay.channels * lay.multiplier:
            self._opaque(node, "input features do not match the channel layout")
            return
        if node.op == "Gemm":
            c = g.const_value(g.input(node, 2))
            if g.input(node, 2) is not None and c is None:
                self._opaque(node, "bias is not a constant")
                return
        self._produce(node, int(w.shape[0] if trans_b else w.shape[1]))

    def _binary(self, node: Node, ins: list[Layout | None]) -> None:
        g = self.graph
        out = node.outputs[0]
        n_out = _channels(g, out)
        tensors = [lay for lay in ins if lay is not None]
        full = [lay for lay, t in zip(ins, node.inputs, strict=True)
                if lay is not None and _channels(g, t) == n_out]
        if not full or n_out is None:
            self._opaque(node, "broadcasts over the channel axis")
            return
        base = full[0]
        for other in full[1:]:
            if [n for _, n in other.segments] != [n for _, n in base.segments] or (
                    other.multiplier != base.multiplier):
                self._opaque(node, "operands have different channel layouts")
                return
            for (a, _), (b, _) in zip(base.segments, other.segments, strict=True):
                self._union(a, b)
        for lay, t in zip(ins, node.inputs, strict=True):
            if lay is None and t is not None and g.const_value(t) is None:
                self._opaque(node, "operand of unknown layout")
                return
        del tensors
        self.layouts[out.name] = Layout(list(base.segments), base.multiplier)

    def _concat(self, node: Node, ins: list[Layout | None]) -> None:
        g = self.graph
        rank = len(g.shape(node.outputs[0]) or g.shape(node.inputs[0]) or ())
        axis = int(node.attrs.get("axis", 1))
        if rank and axis < 0:
            axis += rank
        if axis != 1 or any(lay is None or lay.multiplier != 1 for lay in ins):
            self._opaque(node, "concatenates along another axis or unknown inputs")
            return
        segments = [seg for lay in ins if lay is not None for seg in lay.segments]
        self.layouts[node.outputs[0].name] = Layout(segments)

    def _flatten(self, node: Node, lay: Layout | None) -> None:
        g = self.graph
        shape_in = g.shape(node.inputs[0])
        shape_out = g.shape(node.outputs[0])
        ok = (lay is not None and shape_in is not None and shape_out is not None
              and len(shape_out) == 2 and len(shape_in) >= 2
              and all(isinstance(d, int) for d in shape_in[1:]))
        if ok and node.op == "Flatten":
            ok = int(node.attrs.get("axis", 1)) == 1
        if ok and node.op == "Reshape":
            ok = g.const_value(g.input(node, 1)) is not None
        if not ok or lay is None or shape_in is None:
            self._opaque(node, "reshapes the channel axis (only [N, C, ...] -> [N, C*...])")
            return
        spatial = int(np.prod([int(d) for d in shape_in[2:]], dtype=np.int64))
        self.layouts[node.outputs[0].name] = Layout(list(lay.segments),
                                                    lay.multiplier * spatial)

    # ------------------------------------------------------------------ groups
    def _groups(self) -> list[Group]:
        members: dict[int, list[int]] = {}
        for s in range(len(self._parent)):
            members.setdefault(self.find(s), []).append(s)
        out = []
        for root, spaces in members.items():
            blocked = [r for s in spaces for r in self._blocked.get(s, [])]
            producers = [p for s in spaces for p in self._producers.get(s, [])]
            out.append(Group(root, self._size[root], producers, list(dict.fromkeys(blocked)),
                             spaces))
        return out

    def group_of(self, space: int) -> int:
        """The group id (root space) of a space."""
        return self.find(space)

    def keep_indices(self, tensor: str, keep: Mapping[int, np.ndarray],
                     features: bool = True) -> np.ndarray | None:
        """Kept channel (or feature, with the multiplier) indices of ``tensor``; None: all."""
        lay = self.layouts.get(tensor)
        if lay is None:
            return None
        parts, offset, changed = [], 0, False
        for s, n in lay.segments:
            k = keep.get(self.find(s))
            if k is None:
                parts.append(np.arange(n) + offset)
            else:
                parts.append(np.asarray(k, dtype=np.int64) + offset)
                changed = True
            offset += n
        if not changed:
            return None
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if features and lay.multiplier > 1:
            m = lay.multiplier
            idx = (idx[:, None] * m + np.arange(m)[None, :]).reshape(-1)
        return idx


def channel_features(dep: DepGraph, tensor: str, group_id: int) -> np.ndarray | None:
    """Where each channel of a group sits in ``tensor``'s features, or None if absent.

    Returns ``[group size, places * multiplier]`` feature indices (the multiplier of a
    flattened tensor expands each channel into consecutive features).

    A group present in several segments (e.g. ``Concat(x, x)``) lists all its places.
    """
    lay = dep.layouts.get(tensor)
    if lay is None:
        return None
    places, offset = [], 0
    for s, n in lay.segments:
        if dep.find(s) == group_id:
            places.append(np.arange(n) + offset)
        offset += n
    if not places:
        return None
    ch = np.stack(places, axis=1)  # [n, places]
    m = lay.multiplier
    return (ch[:, :, None] * m + np.arange(m)[None, None, :]).reshape(ch.shape[0], -1)


def _is_shape_like(graph: Graph, tensor: Any) -> bool:
    """A small integer tensor (shape arithmetic), not a feature map."""
    shape = graph.shape(tensor)
    dtype = getattr(tensor, "dtype", None)
    return bool(shape is not None and len(shape) <= 1) or (
        dtype is not None and np.dtype(dtype).kind in "iub")


def _channels(graph: Graph, tensor: Any) -> int | None:
    shape = graph.shape(tensor)
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    return int(shape[1])


# ====================================================================== applying a prune
def apply(dep: DepGraph, keep: Mapping[int, np.ndarray]) -> None:
    """Slice every parameter of ``dep.graph`` for the kept channels of the given groups.

    ``keep`` maps group ids (see :attr:`Group.id`) to sorted channel indices to keep.
    """
    g = dep.graph
    for group_id, k in keep.items():
        if len(k) == 0:
            raise ValueError(f"group {group_id}: cannot prune every channel")
    for node in g.nodes:
        if not node.inputs or not node.outputs:
            continue
        in_keep = dep.keep_indices(node.inputs[0].name, keep)
        out_keep = dep.keep_indices(node.outputs[0].name, keep)
        if in_keep is None and out_keep is None:
            continue
        _slice_node(dep, node, in_keep, out_keep)


def _set_const(g: Graph, node: Node, index: int, value: np.ndarray) -> None:
    g.set_input_constant(node, index, value)


def _take(value: np.ndarray, idx: np.ndarray | None, axis: int) -> np.ndarray:
    return value if idx is None else np.take(value, idx, axis=axis)


def _slice_node(dep: DepGraph, node: Node, in_keep: np.ndarray | None,
                out_keep: np.ndarray | None) -> None:
    g = dep.graph
    op = node.op
    if op == "Conv":
        w = g.const_value(g.input(node, 1))
        assert w is not None
        group = int(node.attrs.get("group", 1))
        if group > 1:  # depthwise: in == out
            idx = out_keep if out_keep is not None else in_keep
            _set_const(g, node, 1, _take(w, idx, 0))
            node.attrs["group"] = int(len(idx)) if idx is not None else group
        else:
            _set_const(g, node, 1, _take(_take(w, out_keep, 0), in_keep, 1))
            idx = out_keep
        b = g.input(node, 2)
        if b is not None and idx is not None:
            _set_const(g, node, 2, _take(g.const_value(b), idx, 0))  # type: ignore[arg-type]
    elif op == "ConvTranspose":
        w = g.const_value(g.input(node, 1))
        assert w is not None
        _set_const(g, node, 1, _take(_take(w, in_keep, 0), out_keep, 1))
        b = g.input(node, 2)
        if b is not None and out_keep is not None:
            _set_const(g, node, 2, _take(g.const_value(b), out_keep, 0))  # type: ignore[arg-type]
    elif op in ("Gemm", "MatMul"):
        w = g.const_value(g.input(node, 1))
        assert w is not None
        trans_b = op == "Gemm" and bool(node.attrs.get("transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        _set_const(g, node, 1, _take(_take(w, in_keep, in_axis), out_keep, out_axis))
        c = g.input(node, 2) if op == "Gemm" else None
        if c is not None and out_keep is not None:
            cv = g.const_value(c)
            assert cv is not None
            if cv.ndim >= 1 and cv.shape[-1] > 1:
                _set_const(g, node, 2, np.take(cv, out_keep, axis=cv.ndim - 1))
    elif op in PER_CHANNEL_PARAMS:
        for i in PER_CHANNEL_PARAMS[op]:
            v = g.const_value(g.input(node, i))
            if v is not None and out_keep is not None:
                _set_const(g, node, i, _take(v, out_keep, 0))
    elif op == "PRelu" or op in BINARY:
        rank = len(g.shape(node.outputs[0]) or ())
        for i, t in enumerate(node.inputs):
            if i == 0 and op == "PRelu":
                continue
            v = g.const_value(t)
            if v is None or out_keep is None:
                continue
            axis = _channel_axis_of_const(v, rank)
            if axis is not None:
                _set_const(g, node, i, _take(v, out_keep, axis))
    elif op == "Reshape" and out_keep is not None:
        shape = g.const_value(g.input(node, 1))
        assert shape is not None
        new = np.array([shape[0], len(out_keep)], dtype=np.int64)
        if int(shape[0]) == -1:
            new = np.array([-1, len(out_keep)], dtype=np.int64)
        _set_const(g, node, 1, new)


def _channel_axis_of_const(v: np.ndarray, rank: int) -> int | None:
    """The axis of a broadcast constant that lines up with the channel axis (1), if sized > 1."""
    if v.ndim == 0 or rank < 2:
        return None
    axis = v.ndim - (rank - 1)  # right-aligned broadcasting
    if axis < 0 or v.shape[axis] == 1:
        return None
    return axis
